import pytest
import torch

from pagedkv.kvcache import OutOfBlocksError

from .conftest import fill, make_manager, read


def test_slots_follow_the_block_table():
    mgr = make_manager()
    assert mgr.allocate("a") == 0
    slots = mgr.append("a", 10)
    table = mgr.block_tables(["a"])[0]
    assert table.dtype == torch.int32 and table.shape == (3,)
    expected = torch.tensor([int(table[p // 4]) * 4 + p % 4 for p in range(10)])
    assert torch.equal(slots, expected)
    assert slots.dtype == torch.int64
    assert mgr.seq_len("a") == 10 and mgr.seq_lens(["a"]).tolist() == [10]
    mgr.check_invariants()


def test_step_describes_a_packed_forward_and_pads_tables_with_zero():
    mgr = make_manager()
    for s, n in [("a", 3), ("b", 9)]:
        mgr.allocate(s)
        mgr.append(s, n)
    step = mgr.step(["a", "b"], [2, 1])
    tables = mgr.block_tables(["a", "b"])
    assert torch.equal(step.block_tables, tables)
    assert tables.shape == (2, 3) and int(tables[0, 2]) == 0
    a_pos, b_pos = [3, 4], [9]
    expected = [int(tables[0, p // 4]) * 4 + p % 4 for p in a_pos]
    expected += [int(tables[1, p // 4]) * 4 + p % 4 for p in b_pos]
    assert step.slot_mapping.tolist() == expected
    assert step.seq_lens.tolist() == [5, 10] and step.query_start_loc.tolist() == [0, 2, 3]
    assert step.seq_ids == ("a", "b") and step.state == "open"
    step.commit()
    assert step.state == "committed"
    assert mgr.seq_lens(["b", "a"]).tolist() == [10, 5]
    decode = mgr.step(["a", "b"], 1)
    assert decode.query_start_loc is None and decode.slot_mapping.shape == (2,)
    decode.commit()
    mgr.check_invariants()


def test_step_with_query_windows_and_forks():
    # A padded batch: each row has 3 queries, its new tokens the last of them; "a" is forked
    # into two more rows that share its blocks (beam expansion) and write nothing.
    mgr = make_manager()
    mgr.allocate("a")
    mgr.allocate("b")
    mgr.append("b", 5)
    step = mgr.step(["a", "b"], [3, 1], num_queries=3, forks=[["a1", "a2"], []])
    assert step.seq_ids == ("a", "a1", "a2", "b")
    tables = step.block_tables
    a_slots = [int(tables[0, 0]) * 4 + p for p in range(3)]
    b_slot = int(tables[3, 1]) * 4 + 1
    assert step.slot_mapping.tolist() == a_slots + [-1] * 6 + [-1, -1, b_slot]
    assert step.query_start_loc.tolist() == [0, 3, 6, 9, 12]
    assert step.seq_lens.tolist() == [3, 3, 3, 6]
    assert tables[1].tolist() == tables[0].tolist() == tables[2].tolist()
    step.commit()
    assert mgr.num_used_blocks == 1 + 2
    mgr.check_invariants()


def test_written_kv_reads_back():
    mgr = make_manager()
    mgr.allocate("a")
    written = fill(mgr, "a", mgr.append("a", 7), seed=0)
    k, v = read(mgr, "a", 1)
    assert torch.equal(k, written[1][0]) and torch.equal(v, written[1][1])


def test_prefix_hit_returns_the_kv_written_for_those_tokens():
    mgr = make_manager()
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks of 4 + 3
    assert mgr.allocate("a", prompt) == 0
    written = fill(mgr, "a", mgr.append("a", 11), seed=1)
    mgr.free("a")
    assert mgr.allocate("b", prompt + [5, 6]) == 8
    k, v = read(mgr, "b", 0)
    assert torch.equal(k, written[0][0][:8]) and torch.equal(v, written[0][1][:8])
    stats = mgr.stats
    assert (stats.prefix_queries, stats.prefix_hits) == (11 + 13, 8)
    mgr.check_invariants()


def test_cached_prefix_tells_what_allocate_finds_and_takes_nothing():
    mgr = make_manager()
    prompt = list(range(100, 111))  # 2 full blocks of 4 + 3
    mgr.allocate("a", prompt)
    mgr.append("a", 11)
    mgr.allocate("held", prompt[:8] + [1])  # holds the first block... and the second
    mgr.free("a")  # the two prompt blocks: held by "held"; a's last block is free
    mgr.free("held")
    mgr.allocate("again", prompt[:5])  # takes block 0 back: in use now, not free
    before = (mgr.num_free_blocks, mgr.stats)
    assert mgr.cached_prefix(prompt + [7]) == (8, [1])  # block 1 is free: allocate revives it
    assert mgr.cached_prefix(prompt, extra_key="other") == (0, [0])
    assert (mgr.num_free_blocks, mgr.stats) == before
    free = mgr.num_free_blocks
    assert mgr.allocate("b", prompt + [7]) == 8
    assert mgr.num_free_blocks == free - 1
    with pytest.raises(ValueError, match="token"):
        mgr.cached_prefix([1, 2.5])
    mgr.check_invariants()


def test_prefix_lookup_always_leaves_a_token_to_compute():
    mgr = make_manager()
    prompt = list(range(8))  # exactly two blocks
    mgr.allocate("a", prompt)
    mgr.append("a", 8)
    assert mgr.stats.num_cached_blocks == 2
    assert mgr.allocate("b", prompt) == 4  # the last block is recomputed
    assert mgr.allocate("c", prompt[:5]) == 4
    assert mgr.allocate("d", prompt[:4]) == 0


def test_prefix_stops_at_first_mismatch_and_extra_key_separates():
    mgr = make_manager()
    mgr.allocate("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], extra_key="m1")
    mgr.append("a", 9)
    assert mgr.allocate("b", [1, 2, 3, 4, 0, 6, 7, 8, 9], extra_key="m1") == 4
    assert mgr.allocate("c", [1, 2, 3, 4, 5, 6, 7, 8, 9], extra_key="m2") == 0
    assert mgr.allocate("d", [1, 2, 3, 4, 5, 6, 7, 8, 9], extra_key="m1") == 8


def test_blocks_fill_and_register_with_append_token_ids():
    mgr = make_manager()
    mgr.allocate("a")
    mgr.append("a", 3, token_ids=[1, 2, 3])
    assert mgr.stats.num_cached_blocks == 0
    mgr.append("a", 1, token_ids=[4])
    mgr.step(["a"], 4, token_ids=torch.tensor([[5, 6, 7, 8]])).commit()
    assert mgr.stats.num_cached_blocks == 2
    assert mgr.allocate("b", list(range(1, 10))) == 8
    assert mgr.token_ids("a") == list(range(1, 9))
    # Tokens appended without ids leave a gap: nothing after it is registered...
    mgr.append("a", 4)
    mgr.append("a", 4, token_ids=[13, 14, 15, 16])
    assert mgr.stats.num_cached_blocks == 2 and mgr.token_ids("a") == list(range(1, 9))
    # ...until a truncate cuts the sequence back to where its ids are known.
    mgr.truncate("a", 8)
    mgr.append("a", 4, token_ids=[9, 10, 11, 12])
    assert mgr.stats.num_cached_blocks == 3
    assert mgr.allocate("c", list(range(1, 14))) == 12


def test_appends_continue_the_declared_prompt_and_must_agree_with_it():
    mgr = make_manager()
    mgr.allocate("a", [1, 2, 3, 4, 5, 6])
    mgr.append("a", 2)  # no ids: tokens 1, 2 of the prompt
    with pytest.raises(ValueError, match="token id 9 at position 3 contradicts 4"):
        mgr.append("a", 3, token_ids=[3, 9, 5])
    assert mgr.seq_len("a") == 2
    mgr.append("a", 3, token_ids=[3, 4, 5])
    mgr.append("a", 3, token_ids=[6, 7, 8])  # past the prompt: new tokens
    assert mgr.token_ids("a") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert mgr.stats.num_cached_blocks == 2
    mgr.check_invariants()


def test_fork_shares_blocks_and_copies_the_shared_last_block_on_write():
    mgr = make_manager()
    mgr.allocate("p")
    written = fill(mgr, "p", mgr.append("p", 6), seed=2)
    mgr.fork("p", "c")
    assert mgr.num_used_blocks == 2
    assert mgr.block_tables(["p"]).tolist() == mgr.block_tables(["c"]).tolist()
    child_slot = mgr.append("c", 1)
    assert mgr.stats.cow_copies == 1 and mgr.num_used_blocks == 3
    tp, tc = mgr.block_tables(["p"])[0], mgr.block_tables(["c"])[0]
    assert tp[0] == tc[0] and tp[1] != tc[1]  # full first block still shared
    fill(mgr, "c", child_slot, seed=3)
    kp, _ = read(mgr, "p", 0)
    kc, _ = read(mgr, "c", 0)
    assert torch.equal(kp, written[0][0])  # parent untouched by the child's write
    assert torch.equal(kc[:6], written[0][0])  # the child's copy holds the shared tokens
    # The parent is now sole owner of its last block: no second copy.
    mgr.append("p", 1)
    assert mgr.stats.cow_copies == 1
    mgr.check_invariants()


def test_no_copy_when_the_shared_block_is_full():
    mgr = make_manager()
    mgr.allocate("p")
    mgr.append("p", 8)
    mgr.fork("p", "c")
    mgr.step(["p", "c"], 1).commit()
    assert mgr.stats.cow_copies == 0 and mgr.num_used_blocks == 4


def test_reorder_moves_tables_with_ref_counts_only():
    mgr = make_manager()
    mgr.allocate("b0")
    mgr.append("b0", 6)
    for s in ("b1", "b2"):
        mgr.fork("b0", s)
    mgr.step(["b0", "b1", "b2"], 1).commit()  # b0 and b1 copy the shared block, b2 keeps it
    assert mgr.stats.cow_copies == 2
    before = mgr.num_used_blocks
    tables = mgr.block_tables(["b0", "b1", "b2"])
    mgr.reorder(["b0", "b1", "b2"], [2, 2, 0])
    after = mgr.block_tables(["b0", "b1", "b2"])
    assert after[0].tolist() == tables[2].tolist() == after[1].tolist()
    assert after[2].tolist() == tables[0].tolist()
    assert mgr.num_used_blocks == before - 1  # b1's old private block was released
    assert mgr.stats.cow_copies == 2
    mgr.check_invariants()
    mgr.step(["b0", "b1", "b2"], 1).commit()  # b0 and b1 share a partial block: one copies
    assert mgr.stats.cow_copies == 3
    mgr.check_invariants()


def test_reorder_validates_indices():
    mgr = make_manager()
    for s in ("a", "b"):
        mgr.allocate(s)
        mgr.append(s, 1)
    for bad in ([0, 2], [0.0, 1.0], [True, False], [0]):
        with pytest.raises(ValueError, match="src_indices must hold 2 integer indices"):
            mgr.reorder(["a", "b"], bad)
    with pytest.raises(ValueError, match="duplicate"):
        mgr.reorder(["a", "a"], [0, 1])
    mgr.check_invariants()


def test_truncate_frees_blocks_and_unregisters_a_block_it_will_overwrite():
    mgr = make_manager()
    mgr.allocate("a", list(range(12)))
    mgr.append("a", 12)
    assert mgr.stats.num_cached_blocks == 3
    mgr.truncate("a", 6)
    assert mgr.seq_len("a") == 6 and mgr.num_used_blocks == 2
    # Block 1 keeps tokens 4..5 and will be overwritten from 6 on: no longer a cached prefix.
    assert mgr.stats.num_cached_blocks == 2  # blocks 0 and 2 (2 now free but still cached)
    assert mgr.allocate("b", list(range(12))) == 4
    mgr.check_invariants()
    with pytest.raises(ValueError, match="cannot truncate 'a' to 7 tokens"):
        mgr.truncate("a", 7)


def test_truncate_of_a_shared_block_copies_on_next_write():
    mgr = make_manager()
    mgr.allocate("a")
    mgr.append("a", 8)
    mgr.fork("a", "b")
    mgr.truncate("b", 6)
    mgr.append("b", 1)
    assert mgr.stats.cow_copies == 1
    mgr.check_invariants()


def _snapshot(mgr, ids):
    return (
        mgr.num_free_blocks,
        mgr.block_tables(ids).tolist(),
        mgr.seq_lens(ids).tolist(),
        [mgr.token_ids(s) for s in ids],
        mgr.seq_ids,
    )


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_failed_step_changes_nothing_and_registers_nothing(error):
    mgr = make_manager(block_size=2)
    mgr.allocate("a", [11, 12, 13])
    fill(mgr, "a", mgr.append("a", 3), seed=1)  # [11, 12] registered
    mgr.fork("a", "b")  # shares a's partial last block
    before = _snapshot(mgr, ["a", "b"])
    cached = mgr.stats.num_cached_blocks
    with (
        pytest.raises(error),
        mgr.step(["a", "b"], [3, 1], token_ids=[[14, 15, 16], [24]], forks=[["a1"], []]) as step,
    ):
        step.write(0, *[torch.zeros(7, 2, 8)] * 2)  # one layer of two, then the forward dies
        raise error
    assert step.state == "aborted"
    assert _snapshot(mgr, ["a", "b"]) == before
    assert mgr.stats.num_cached_blocks == cached and mgr.stats.cow_copies == 0
    assert mgr.allocate("c", [11, 12, 13, 14, 15, 16]) == 2  # [13, 14] was never written
    mgr.check_invariants()
    # Still shared: each write copies the block (the undo kept a's original block in place).
    mgr.step(["a", "b"], 1).commit()
    assert mgr.stats.cow_copies == 1
    mgr.check_invariants()


def test_an_open_step_holds_its_sequences():
    mgr = make_manager()
    mgr.allocate("a")
    mgr.allocate("x")
    step = mgr.step(["a"], 2)
    for call in (
        lambda: mgr.free("a"),
        lambda: mgr.truncate("a", 0),
        lambda: mgr.fork("a", "c"),
        lambda: mgr.step(["x", "a"], 1),
    ):
        with pytest.raises(ValueError, match="open step holds it"):
            call()
    mgr.step(["x"], 1).commit()  # other sequences step on
    step.abort()
    step.abort()  # aborting twice is harmless
    with pytest.raises(RuntimeError, match="cannot commit a step that is aborted"):
        step.commit()
    with pytest.raises(RuntimeError, match="cannot write through a step that is aborted"):
        step.write(0, *[torch.zeros(2, 2, 8)] * 2)
    mgr.free("a")
    mgr.check_invariants()


def test_when_every_holder_writes_the_longest_stays_in_place():
    # "x" and "y" share a partial block; "y" was cut inside it. Both write in one step: "y"
    # copies, "x" (the longest) writes in place, so an undo could give "y" the block back.
    mgr = make_manager(num_blocks=4)
    mgr.allocate("x")
    fill(mgr, "x", mgr.append("x", 3), seed=1)
    mgr.fork("x", "y")
    mgr.truncate("y", 1)
    table = mgr.block_tables(["x"]).tolist()
    step = mgr.step(["x", "y"], 1)
    assert step.block_tables[0].tolist() == table[0]
    assert step.block_tables[1].tolist() != table[0]
    step.commit()
    assert mgr.stats.cow_copies == 1 and mgr.num_used_blocks == 2
    mgr.check_invariants()


def test_a_block_truncated_while_shared_leaves_the_prefix_cache_when_overwritten():
    # Found by the stateful test: "b" shares "a"'s registered full block, "a" is cut inside
    # it, "b" goes away, and "a" (now its sole owner) writes its tail in place. The block must
    # stop answering prefix lookups for the tokens it held before.
    mgr = make_manager(block_size=2)
    mgr.allocate("a", [11, 12])
    fill(mgr, "a", mgr.append("a", 2), seed=1)
    mgr.fork("a", "b")
    mgr.truncate("a", 1)
    assert mgr.stats.num_cached_blocks == 1  # "b" still holds [11, 12] in it
    mgr.free("b")
    fill(mgr, "a", mgr.append("a", 1), seed=2)
    assert mgr.stats.num_cached_blocks == 0 and mgr.stats.cow_copies == 0
    assert mgr.allocate("c", [11, 12, 13]) == 0
    mgr.check_invariants()


def test_failed_batch_append_keeps_the_copy_on_write_of_a_shared_block():
    # "y" is "x" cut to one token, inside the block they share. A batch append that runs out
    # of blocks must leave "y" marked as sharing it, so that "y" appending alone later copies
    # the block instead of overwriting "x"'s second token in place.
    mgr = make_manager(block_size=4, num_blocks=3)
    mgr.allocate("x")
    fill(mgr, "x", mgr.append("x", 3), seed=1)
    mgr.fork("x", "y")
    mgr.truncate("y", 1)
    mgr.allocate("z")
    mgr.append("z", 5)  # takes the last two blocks
    with pytest.raises(OutOfBlocksError):
        mgr.step(["x", "y"], 1)
    x_before = read(mgr, "x", 0)
    mgr.free("z")
    fill(mgr, "y", mgr.append("y", 1), seed=2)
    assert mgr.stats.cow_copies == 1
    k, v = read(mgr, "x", 0)
    assert torch.equal(k, x_before[0]) and torch.equal(v, x_before[1])
    mgr.check_invariants()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swap_round_trip_is_bit_exact(dtype):
    mgr = make_manager(num_cpu_blocks=8, dtype=dtype)
    mgr.allocate("a")
    fill(mgr, "a", mgr.append("a", 10), seed=4)
    before = [read(mgr, "a", layer) for layer in range(2)]
    mgr.swap_out("a")
    assert mgr.num_used_blocks == 0 and mgr.seq_len("a") == 10
    mgr.allocate("x")
    fill(mgr, "x", mgr.append("x", 12), seed=5)  # reuse the freed device blocks
    mgr.swap_in("a")
    for layer in range(2):
        k, v = read(mgr, "a", layer)
        assert torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1])
    s = mgr.stats
    assert (s.swapped_out_blocks, s.swapped_in_blocks) == (3, 3)
    mgr.check_invariants()


def test_swapped_sequence_refuses_device_ops_and_can_be_freed():
    mgr = make_manager(num_cpu_blocks=4)
    mgr.allocate("a")
    mgr.append("a", 5)
    mgr.swap_out("a")
    with pytest.raises(ValueError, match="swapped out; call swap_in"):
        mgr.append("a", 1)
    with pytest.raises(ValueError, match="swapped out"):
        mgr.block_tables(["a"])
    mgr.free("a")
    assert "a" not in mgr
    mgr.check_invariants()


def test_swap_in_without_room_changes_nothing():
    mgr = make_manager(num_blocks=4, num_cpu_blocks=4)
    mgr.allocate("a")
    mgr.append("a", 12)
    mgr.swap_out("a")
    mgr.allocate("b")
    mgr.append("b", 8)
    with pytest.raises(OutOfBlocksError, match="needed 3, free 2, total 4"):
        mgr.swap_in("a")
    assert mgr.swapped_seq_ids == ["a"] and mgr.num_free_blocks == 2
    mgr.check_invariants()


def test_swap_needs_cpu_space():
    mgr = make_manager()
    mgr.allocate("a")
    with pytest.raises(ValueError, match="num_cpu_blocks > 0"):
        mgr.swap_out("a")
    small = make_manager(num_cpu_blocks=1)
    small.allocate("a")
    small.append("a", 5)
    with pytest.raises(OutOfBlocksError, match="CPU swap space"):
        small.swap_out("a")
    small.check_invariants()


def test_out_of_blocks_names_the_numbers_and_leaks_nothing():
    mgr = make_manager(num_blocks=4)
    mgr.allocate("a")
    mgr.append("a", 10)
    mgr.allocate("b")
    with pytest.raises(OutOfBlocksError) as info:
        mgr.append("b", 5)
    assert (info.value.needed, info.value.free, info.value.total) == (2, 1, 4)
    assert "num_blocks" in str(info.value)
    assert mgr.seq_len("b") == 0 and mgr.num_free_blocks == 1
    with pytest.raises(OutOfBlocksError):
        mgr.step(["a", "b"], 4)  # all or nothing
    assert mgr.seq_lens(["a", "b"]).tolist() == [10, 0] and mgr.num_free_blocks == 1
    mgr.check_invariants()


@pytest.mark.parametrize(
    "call, match",
    [
        pytest.param(lambda m: m.allocate("a"), "already allocated", id="duplicate-id"),
        pytest.param(lambda m: m.append("zz", 1), "unknown sequence id 'zz'", id="unknown-id"),
        pytest.param(lambda m: m.append("a", 0), "num_tokens=0", id="zero-tokens"),
        pytest.param(lambda m: m.append("a", -3), "num_tokens=-3", id="negative-tokens"),
        pytest.param(lambda m: m.append("a", True), "num_tokens=True", id="bool-tokens"),
        pytest.param(
            lambda m: m.append("a", 2, token_ids=[1]),
            "lengths \\[1\\]; expected \\[2\\]",
            id="ids-mismatch",
        ),
        pytest.param(
            lambda m: m.append("a", 1, token_ids=[1.5]), "must hold integers", id="float-ids"
        ),
        pytest.param(
            lambda m: m.step(["a"], 1, token_ids=torch.ones(1, 1)), "dtype", id="float-tensor"
        ),
        pytest.param(lambda m: m.step(["a", "a"]), "duplicate sequence ids", id="dup-step"),
        pytest.param(lambda m: m.step([]), "at least one sequence", id="empty-step"),
        pytest.param(lambda m: m.step(["a"], [1, 2]), "one per sequence", id="counts"),
        pytest.param(lambda m: m.step(["a"], 2, num_queries=1), "num_queries=1", id="short-window"),
        pytest.param(
            lambda m: m.step(["a"], 1, forks=[["a"]]), "already allocated", id="fork-into-live"
        ),
        pytest.param(
            lambda m: m.step(["a"], 1, forks=[["c", "c"]]), "duplicate ids", id="fork-twice"
        ),
        pytest.param(lambda m: m.fork("a", "a"), "already allocated", id="fork-onto-self"),
        pytest.param(lambda m: m.fork("zz", "b"), "unknown sequence id 'zz'", id="fork-unknown"),
        pytest.param(lambda m: m.allocate([1]), "not hashable", id="unhashable-id"),
        pytest.param(lambda m: m.allocate("b", ["x"]), "must hold integers", id="bad-token-ids"),
        pytest.param(lambda m: m.allocate("b", "abc"), "sequence of ints", id="str-token-ids"),
        pytest.param(lambda m: m.swap_in("a"), "not swapped out", id="swap-in-resident"),
    ],
)
def test_bad_input_raises_and_changes_nothing(call, match):
    mgr = make_manager()
    mgr.allocate("a", [1, 2, 3])
    mgr.append("a", 3)
    before = (mgr.stats, mgr.block_tables(["a"]).tolist(), mgr.seq_ids)
    with pytest.raises(ValueError, match=match):
        call(mgr)
    assert (mgr.stats, mgr.block_tables(["a"]).tolist(), mgr.seq_ids) == before
    mgr.check_invariants()


def test_double_free_raises():
    mgr = make_manager()
    mgr.allocate("a")
    mgr.append("a", 3)
    mgr.free("a")
    with pytest.raises(ValueError, match="already freed"):
        mgr.free("a")
    assert mgr.num_free_blocks == 32


@pytest.mark.parametrize(
    "key_shape, dtype, match",
    [
        pytest.param(
            (3, 2, 4),
            torch.float32,
            r"shape \[3, 2, 4\], expected \[\*, 2, 8\]",
            id="wrong-head-dim",
        ),
        pytest.param((3, 3, 8), torch.float32, r"shape \[3, 3, 8\]", id="wrong-heads"),
        pytest.param((3, 2, 8), torch.float64, "dtype float64", id="wrong-dtype"),
        pytest.param(
            (4, 2, 8),
            torch.float32,
            r"slot_mapping has shape \[3\], expected \[4\]",
            id="more-tokens-than-slots",
        ),
    ],
)
def test_writing_a_wrong_kv_tensor_raises_and_writes_nothing(key_shape, dtype, match):
    mgr = make_manager()
    mgr.allocate("a")
    slots = mgr.append("a", 3)
    pool_before = mgr.cache.pool.clone()
    k = torch.randn(key_shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        mgr.cache.write(0, k, k.clone(), slots)
    assert torch.equal(mgr.cache.pool, pool_before)


def test_reset_prefix_cache():
    mgr = make_manager()
    mgr.allocate("a", list(range(9)))
    mgr.append("a", 9)
    mgr.free("a")
    assert mgr.reset_prefix_cache() == 2
    assert mgr.allocate("b", list(range(9))) == 0


def test_stats_repr_and_block_map():
    mgr = make_manager()
    mgr.allocate("a", list(range(6)))
    mgr.append("a", 6)
    mgr.fork("a", "b")
    s = mgr.stats
    assert (s.num_used_blocks, s.num_free_blocks, s.num_seqs) == (2, 30, 2)
    assert s.usage == pytest.approx(2 / 32)
    assert s.as_dict()["usage"] == pytest.approx(2 / 32)
    text = repr(mgr)
    assert "seqs=2" in text and "2/32 used" in text
    states = [b["state"] for b in mgr.block_map()]
    assert states.count("shared") == 2 and states.count("free") == 30
    html = mgr._repr_html_()
    assert html.count("block ") >= 32 and "shared" in html


def test_peak_usage_counts_the_most_blocks_held_at_once():
    mgr = make_manager()
    mgr.allocate("a", list(range(9)))
    mgr.append("a", 9)  # 3 blocks, the 2 full ones registered
    mgr.fork("a", "b")
    mgr.append("b", 1)  # copy-on-write of the shared last block: 4
    mgr.free("b")
    assert mgr.num_used_blocks == 3
    assert mgr.stats.peak_used_blocks == 4
    assert mgr.peak_used_bytes == 4 * mgr.config.bytes_per_block
    mgr.reset_peak_usage()
    assert mgr.stats.peak_used_blocks == 3
    mgr.free("a")
    mgr.reset_peak_usage()
    assert mgr.stats.peak_used_blocks == 0
    assert mgr.allocate("c", list(range(9))) == 8  # a prefix hit revives 2 cached free blocks
    assert mgr.stats.peak_used_blocks == 2


@pytest.mark.parametrize("layer", [True, 2, -1, 1.0])
def test_a_layer_index_must_be_an_integer_in_range(layer):
    mgr = make_manager()
    mgr.allocate("a")
    slots = mgr.append("a", 2)
    k = torch.zeros(2, 2, 8)
    with pytest.raises(
        ValueError, match=f"layer={layer!r} is invalid; expected an integer in 0..1"
    ):
        mgr.cache.write(layer, k, k, slots)
    assert "pool=32.0 KiB" in repr(mgr)  # 32 blocks of 1 KiB: the size chosen


def test_invalid_tokens_are_stored_but_never_attended_nor_cached():
    """A pad stored inside a padded batch (valid=False) keeps its slot, is hidden from every
    query, and its sequence's blocks stop joining the prefix cache."""
    mgr = make_manager(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4)
    mgr.allocate("a", [1, 2, 3, 4, 5, 6])
    with mgr.step(["a"], 6, token_ids=[[1, 2, 3, 4, 5, 6]], valid=[[1, 0, 1, 1, 0, 1]]) as step:
        k = torch.randn(6, 1, 8)
        v = torch.randn(6, 1, 8)
        step.write(0, k, v)
        q = torch.randn(6, 1, 8)
        out = step.attend(0, q, scale=1.0)
    seen = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    for i in range(6):  # query i sees the valid keys up to its own position
        keys = seen.clone()
        keys[i + 1 :] = False
        weights = torch.softmax(q[i, 0] @ k[keys, 0].T, dim=-1)
        torch.testing.assert_close(out[i, 0], weights @ v[keys, 0], atol=1e-5, rtol=0)
    assert mgr.stats.num_cached_blocks == 0 and mgr.token_ids("a") == []
    assert mgr.cache.slot_valid[0].view(-1)[step.slot_mapping].tolist() == seen.tolist()
    # Copy-on-write and swap carry the validity with the blocks.
    mgr.fork("a", "b")
    mgr.step(["a", "b"], 1, valid=[[True], [True]]).commit()
    table = mgr.block_tables(["b"])[0]
    assert mgr.cache.slot_valid[0][table[1], :3].tolist() == [False, True, True]  # positions 4-6
    mgr.check_invariants()


def test_a_bad_validity_argument_is_refused():
    mgr = make_manager()
    mgr.allocate("a")
    for valid, match in (
        ([[1, 0]], "valid has rows of lengths"),
        ([["x"]], "must hold bools"),
        ([[2]], "must hold bools"),
        (torch.tensor([[0.5]]), "dtype"),
    ):
        with pytest.raises(ValueError, match=match):
            mgr.step(["a"], 1, valid=valid)
    assert mgr.seq_len("a") == 0
