"""KV cache groups: full-attention and sliding-window layers in their own pools.

A sliding group holds its window and no more, its attention equals attention over everything
the model computed, and fork, truncate, swap, the prefix cache, stats and the memory budget
work per group. The oracle is a dense reference: each token's K/V is a function of (token,
position, layer), so attention over the tokens a sequence holds is computed from scratch.
"""

import pytest
import torch
from transformers import Cohere2Config, Gemma2Config, Gemma3TextConfig, MistralConfig

from pagedkv.kvcache import KVCacheConfig, KVCacheManager, OutOfBlocksError
from pagedkv.kvcache.config import CROP_STEP

BS = 4
HEADS, DIM = 2, 4
SCALE = 0.3


def kv_of(tokens, start, layer):
    """K/V of `tokens` at positions start.., one layer: a smooth function of token and position."""
    t = torch.tensor(tokens, dtype=torch.float32)[:, None, None]
    pos = torch.arange(start, start + len(tokens), dtype=torch.float32)[:, None, None]
    h = torch.arange(HEADS, dtype=torch.float32)[None, :, None]
    d = torch.arange(DIM, dtype=torch.float32)[None, None, :]
    k = torch.sin(t * 0.37 + pos * 0.11 + h + d * 0.5 + layer)
    v = torch.cos(t * 0.23 - pos * 0.07 + h * 0.3 + d + layer * 0.5)
    return k, v


def query_of(tokens, start, layer):
    k, _ = kv_of(tokens, start, layer + 7)
    return k


def reference(tokens, layer, positions, window):
    """Attention of the queries at `positions` over tokens[0..p] (within the window)."""
    k, v = kv_of(tokens, 0, layer)
    out = []
    for p in positions:
        lo = 0 if window is None else max(0, p - window + 1)
        q = query_of([tokens[p]], p, layer)[0]  # [H, D]
        s = torch.einsum("hd,khd->hk", q, k[lo : p + 1]) * SCALE
        out.append(torch.einsum("hk,khd->hd", torch.softmax(s, -1), v[lo : p + 1]))
    return torch.stack(out)


def make(windows, num_blocks=64, **kw):
    cfg = KVCacheConfig(
        num_layers=len(windows),
        num_kv_heads=HEADS,
        head_dim=DIM,
        block_size=BS,
        num_blocks=num_blocks,
        layer_windows=windows,
        **kw,
    )
    return KVCacheManager(cfg)


def run(mgr, seqs, new, history):
    """One committed step appending `new[i]` to `seqs[i]`; every layer's attention is checked
    against the reference over `history` (updated)."""
    starts = [len(history[s]) for s in seqs]
    with mgr.step(seqs, [len(n) for n in new], token_ids=new) as step:
        for layer, window in enumerate(mgr.config.layer_windows):
            k = torch.cat([kv_of(n, s, layer)[0] for n, s in zip(new, starts)])
            v = torch.cat([kv_of(n, s, layer)[1] for n, s in zip(new, starts)])
            q = torch.cat([query_of(n, s, layer) for n, s in zip(new, starts)])
            step.write(layer, k, v)
            out = step.attend(layer, q, scale=SCALE)
            expected = torch.cat(
                [
                    reference(history[s] + n, layer, range(st, st + len(n)), window)
                    for s, n, st in zip(seqs, new, starts)
                ]
            )
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for s, n in zip(seqs, new):
        history[s] = history[s] + n
    mgr.check_invariants()


def held(mgr, seq, group):
    return len(mgr.get_blocks(seq, group).blocks)


# ---- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, windows",
    [
        (
            Gemma3TextConfig(num_hidden_layers=6, sliding_window=64),
            (64, 64, 64, 64, 64, None),
        ),
        (Gemma2Config(num_hidden_layers=4, sliding_window=32), (32, None, 32, None)),
        (Cohere2Config(num_hidden_layers=4, sliding_window=16), (16, 16, 16, None)),
        (MistralConfig(num_hidden_layers=3, sliding_window=8), (8, 8, 8)),
        (MistralConfig(num_hidden_layers=3, sliding_window=None), (None, None, None)),
    ],
    ids=["gemma3", "gemma2", "cohere2", "mistral", "mistral-no-window"],
)
def test_layer_windows_come_from_the_model_config(config, windows):
    cfg = KVCacheConfig.from_model_config(config, num_blocks=8)
    assert cfg.layer_windows == windows
    full = [i for i, w in enumerate(windows) if w is None]
    assert cfg.groups[0].window is None if full else cfg.groups[0].window == windows[0]
    assert sorted(i for g in cfg.groups for i in g.layers) == list(range(len(windows)))
    for layer, (g, i) in enumerate(cfg.layer_groups):
        assert cfg.groups[g].layers[i] == layer and cfg.groups[g].window == windows[layer]


def test_gpt_oss_config_gives_alternating_groups():
    from transformers import GptOssConfig

    cfg = KVCacheConfig.from_model_config(
        GptOssConfig(num_hidden_layers=4, sliding_window=16), num_blocks=8
    )
    assert cfg.layer_windows == (16, None, 16, None)
    assert [g.window for g in cfg.groups] == [None, 16]


def test_memory_budget_splits_so_every_group_holds_as_many_sequences():
    # Layer bytes per block: 2 (K, V) * 4 tokens * 2 heads * 4 dims * 4 bytes = 256.
    budget = 10 * (64 * 256 + 17 * 512)
    cfg = KVCacheConfig(
        num_layers=3,
        num_kv_heads=HEADS,
        head_dim=DIM,
        block_size=BS,
        layer_windows=(8, None, 8),
        context_length=256,
        memory_budget_bytes=budget,
    )
    # A sequence of 256 tokens: 64 blocks of the full group; the sliding group (two layers,
    # 512 bytes a block) keeps a prompt of up to CROP_STEP tokens whole until the next step:
    # 16 blocks, plus one a window straddles.
    assert CROP_STEP == 64
    assert cfg.num_blocks == (640, 170)
    assert cfg.total_bytes == budget
    mgr = KVCacheManager(cfg)
    for i in range(10):  # ten short prompts, then ten long sequences
        mgr.allocate(i)
        mgr.append(i, CROP_STEP)
    for i in range(10):
        mgr.append(i, 256 - CROP_STEP)
    assert mgr.allocators[0].num_free_blocks == 0
    assert mgr.stats.groups[1].num_used_blocks <= 10 * 3
    mgr.check_invariants()


def test_block_counts_per_group_are_checked():
    with pytest.raises(ValueError, match=r"num_blocks=\(8, 8, 8\) has 3 counts; expected one per"):
        KVCacheConfig(
            num_layers=2, num_kv_heads=1, head_dim=4, num_blocks=(8, 8, 8), layer_windows=(4, None)
        )
    with pytest.raises(ValueError, match="layer_windows has 1 entries"):
        KVCacheConfig(num_layers=2, num_kv_heads=1, head_dim=4, num_blocks=8, layer_windows=(4,))
    with pytest.raises(ValueError, match="layer_windows entry=0"):
        KVCacheConfig(
            num_layers=2, num_kv_heads=1, head_dim=4, num_blocks=8, layer_windows=(0, None)
        )


# ---- holding the window -------------------------------------------------------------------


@pytest.mark.parametrize("windows", [(None, 6), (6, 6), (None, 6, 9)], ids=str)
def test_a_long_prompt_keeps_only_the_window_and_attends_exactly(windows):
    mgr = make(windows)
    prompt = [(7 * i) % 31 for i in range(CROP_STEP + 37)]
    history = {"a": []}
    mgr.allocate("a", prompt)
    run(mgr, ["a"], [prompt], history)
    n = len(prompt)
    for g, group in enumerate(mgr.config.groups):
        blocks = mgr.get_blocks("a", g)
        if group.window is None:
            assert held(mgr, "a", g) == -(-n // BS)
        else:  # the next query's window: positions n - W + 1 .. n - 1
            assert blocks.stored_from == n - group.window + 1
            first = (n - group.window + 1) // BS
            assert blocks.num_absent == first and held(mgr, "a", g) == -(-n // BS) - first
    for i in range(2 * BS + 3):  # decoding keeps releasing what falls out of the window
        run(mgr, ["a"], [[i % 5]], history)
        for g, group in enumerate(mgr.config.groups):
            if group.window is not None:
                assert held(mgr, "a", g) <= -(-group.window // BS) + 1


def test_short_steps_store_everything_then_release_behind_the_window():
    mgr = make((None, 5))
    history = {"a": []}
    mgr.allocate("a")
    for i in range(12):
        run(mgr, ["a"], [[i, i + 1, i + 2]], history)
        n = len(history["a"])
        start = n - 3  # the last step's first position: a crop back to it must work
        assert mgr.get_blocks("a", 1).stored_from == max(0, start - 5 + 1) // BS * BS
    assert mgr.stats.groups[1].num_used_blocks <= -(-(3 + 5) // BS) + 1


def test_batched_steps_fork_and_beams_per_group():
    mgr = make((None, 6, None, 6))
    history = {"a": [], "b": []}
    mgr.allocate("a")
    mgr.allocate("b")
    run(mgr, ["a", "b"], [list(range(80)), list(range(5, 20))], history)
    mgr.fork("a", "a2")
    history["a2"] = list(history["a"])
    for i in range(9):
        run(mgr, ["a", "a2", "b"], [[i], [i + 10], [i + 20]], history)
    # Beam reorder: both rows continue "a2"; the shared last block is copied on write.
    mgr.reorder(["a", "a2"], [1, 1])
    history["a"] = list(history["a2"])
    for i in range(6):
        run(mgr, ["a", "a2", "b"], [[i], [i + 3], [i]], history)
    mgr.free("a2")
    mgr.free("a")
    mgr.free("b")
    mgr.check_invariants()
    assert mgr.num_used_blocks == 0


def test_padded_batch_rows_with_different_new_counts():
    # num_queries: a row's pad queries sit before its new tokens and may look back past the
    # window its row holds; they read only that row's blocks (their output is discarded).
    mgr = make((None, 6))
    history = {"a": [], "b": []}
    mgr.allocate("a")
    mgr.allocate("b")
    run(mgr, ["a", "b"], [list(range(70)), list(range(3))], history)
    step = mgr.step(["a", "b"], [1, 4], num_queries=4)
    assert step.tables[1].min() >= 0  # no ABSENT entry reaches the kernel
    with step:
        for layer in range(2):
            step.write(layer, torch.zeros(8, HEADS, DIM), torch.zeros(8, HEADS, DIM))
            step.attend(layer, torch.zeros(8, HEADS, DIM), scale=SCALE)


def test_a_sliding_layer_refuses_another_window():
    mgr = make((None, 6))
    mgr.allocate("a")
    with mgr.step(["a"], 3) as step:
        q = torch.zeros(3, HEADS, DIM)
        step.write(1, q, q)
        with pytest.raises(ValueError, match="sliding window 6.*got sliding_window=8"):
            step.attend(1, q, scale=1.0, sliding_window=8)
        step.attend(1, q, scale=1.0, sliding_window=6)
        step.abort()


# ---- truncate, swap, prefix cache ---------------------------------------------------------


def test_truncate_back_into_the_last_short_step_works_and_before_the_window_is_refused():
    mgr = make((None, 6))
    history = {"a": []}
    mgr.allocate("a")
    prompt = list(range(CROP_STEP + 20))
    run(mgr, ["a"], [prompt], history)
    n = len(prompt)
    before = mgr.block_tables(["a"], 1).tolist()
    with pytest.raises(ValueError, match=rf"cannot truncate 'a' to {n - 1} tokens.*sliding"):
        mgr.truncate("a", n - 1)  # a long step keeps only the window of its end
    assert mgr.block_tables(["a"], 1).tolist() == before and mgr.seq_len("a") == n
    run(mgr, ["a"], [[1, 2, 3, 4, 5]], history)  # assisted decoding: 5 candidates
    mgr.truncate("a", n + 2)  # 2 accepted
    mgr.truncate("a", n)  # none: back to the start of the last short step
    history["a"] = history["a"][:n]
    run(mgr, ["a"], [[4, 4, 4]], history)  # the next queries see the right window
    mgr.truncate("a", n + 1)
    history["a"] = history["a"][: n + 1]
    run(mgr, ["a"], [[9]], history)
    with pytest.raises(ValueError, match="sliding window"):
        mgr.truncate("a", n - 3)  # the last step started at n + 1
    mgr.check_invariants()


def test_swap_round_trip_per_group():
    mgr = make((None, 6, 10), num_blocks=(40, 12, 12), num_cpu_blocks=32)
    history = {"a": [], "b": []}
    mgr.allocate("a")
    mgr.allocate("b")
    run(mgr, ["a", "b"], [list(range(90)), list(range(40, 47))], history)
    run(mgr, ["a", "b"], [[1], [2]], history)
    stored = [mgr.get_blocks("a", g).stored_from for g in range(3)]
    free = [a.num_free_blocks for a in mgr.allocators]
    mgr.swap_out("a")
    assert [a.num_free_blocks for a in mgr.allocators][1:] > free[1:]
    run(mgr, ["b"], [[3, 4, 5]], history)
    mgr.swap_in("a")
    assert [mgr.get_blocks("a", g).stored_from for g in range(3)] == stored
    for i in range(5):
        run(mgr, ["a", "b"], [[i], [i]], history)
    mgr.check_invariants()


def test_swap_in_needs_room_in_every_group():
    mgr = make((None, 6), num_blocks=(40, 4), num_cpu_blocks=32)
    history = {"a": [], "b": []}
    mgr.allocate("a")
    run(mgr, ["a"], [list(range(70))], history)
    mgr.swap_out("a")
    mgr.allocate("b")
    run(mgr, ["b"], [list(range(14))], history)  # the sliding pool is full now
    free = [a.num_free_blocks for a in mgr.allocators]
    with pytest.raises(OutOfBlocksError):
        mgr.swap_in("a")
    assert [a.num_free_blocks for a in mgr.allocators] == free and "a" in mgr.swapped_seq_ids
    mgr.check_invariants()


def test_a_prefix_hit_needs_the_window_blocks_of_every_sliding_group():
    # The rule: a hit of n blocks needs every block of a full-attention group, and in a
    # sliding group the blocks the next query's window reaches (the last W - 1 positions).
    mgr = make((None, 6))
    history = {"a": []}
    prompt = [(5 * i + 1) % 29 for i in range(CROP_STEP + 30)]
    mgr.allocate("a", prompt)
    run(mgr, ["a"], [prompt], history)
    answer = [3, 1, 4, 1, 5, 9, 2, 6]
    for t in answer:
        run(mgr, ["a"], [[t]], history)
    mgr.free("a")
    # A long prompt keeps only its end in the sliding group: a prompt sharing its first
    # blocks finds nothing there to start from.
    assert mgr.allocate("b", prompt[:40] + [0, 0, 0]) == 0
    mgr.free("b")
    # The next chat turn continues the whole conversation: everything up to its last full
    # block is found, and the sliding group holds that position's window.
    turn2 = history["a"] + [7, 7, 7]
    cached = mgr.allocate("c", turn2)
    assert cached == (len(history["a"]) // BS) * BS
    blocks = mgr.get_blocks("c", 1)
    assert blocks.stored_from == max(0, cached - 6 + 1) // BS * BS
    assert len(blocks.blocks) == -(-cached // BS) - blocks.num_absent
    history["c"] = turn2[:cached]
    run(mgr, ["c"], [turn2[cached:]], history)  # attention over the hit equals the reference
    mgr.check_invariants()


def test_a_hit_shortens_when_a_sliding_group_lost_its_window_blocks():
    mgr = make((None, 6), num_blocks=(64, 8))
    history = {"a": [], "other": []}
    prompt = list(range(1, CROP_STEP + 16))
    mgr.allocate("a", prompt)
    run(mgr, ["a"], [prompt], history)
    for t in range(9):  # decoding registers the sliding group's blocks as they fill
        run(mgr, ["a"], [[t]], history)
    mgr.free("a")
    n = len(history["a"]) // BS * BS
    assert mgr.allocate("x", history["a"] + [1]) == n
    mgr.free("x")
    # Another sequence fills the sliding pool: the LRU evicts "a"'s window blocks there,
    # while the full-attention group still caches every block of the conversation.
    mgr.allocate("other")
    run(mgr, ["other"], [list(range(100, 100 + 8 * BS))], history)
    mgr.free("other")
    assert mgr.allocators[0].num_cached_blocks >= n // BS
    assert mgr.allocate("y", history["a"] + [1]) == 0
    mgr.check_invariants()


# ---- stats, memory, display ---------------------------------------------------------------


def test_stats_and_bytes_count_every_group():
    mgr = make((None, 6, 6), num_blocks=(32, 16))
    layer_block = 2 * BS * HEADS * DIM * 4
    history = {"a": []}
    mgr.allocate("a")
    mgr.reset_peak_usage()
    run(mgr, ["a"], [list(range(70))], history)
    s = mgr.stats
    full, sliding = s.groups
    assert (full.window, sliding.window) == (None, 6)
    assert full.bytes_per_block == layer_block and sliding.bytes_per_block == 2 * layer_block
    assert (
        s.num_blocks == 48 and s.num_used_blocks == full.num_used_blocks + sliding.num_used_blocks
    )
    assert full.num_used_blocks == 18 and sliding.num_used_blocks == 2
    assert mgr.used_bytes == 18 * layer_block + 2 * 2 * layer_block
    assert s.peak_used_bytes == mgr.peak_used_bytes >= mgr.used_bytes
    assert "per group: full attention 18/32 (peak 18), window 6 2/16 (peak 2)" in str(s)
    html = mgr._repr_html_()
    assert "sliding window 6" in html and "full attention" in html
    assert len(mgr.block_map()) == 32
    assert "groups=[None, 6]" in repr(mgr.cache)
