"""No input makes an op read or write outside its tensors (issue "Trust in everyday use", item 19).

The tensors an op gets are views into the middle of larger buffers whose margins (the guard)
hold a sentinel: NaN for floats, an out-of-range block id for block tables. After the op the
guard must be untouched, and nothing from it may reach an output. Bad index values meet the ops
in two ways:

- on CPU tensors (both backends) the launcher reads them and raises a ValueError naming the
  value and what was expected, before touching anything;
- on CUDA the launcher must not sync to read them: `_checks.checks_values` patched to False
  (fixture `as_on_cuda`) makes the launchers skip the reads, so the Triton kernels (interpreted)
  alone must mask them.

Bad ids are chosen to land in the guard (-1, num_blocks, ...), so that an unmasked kernel is
caught by the guard instead of crashing the run; "wild" ids (2^30, 2^40) land far outside.
"""

from __future__ import annotations

import math

import pytest
import torch

from pagedkv.kernels import _checks, copy_blocks, gather_kv, paged_attention, reference, write_kv
from pagedkv.kernels.testing import oracle_attention

F32 = torch.float32
GUARD = 2  # entries of guard on each side of each guarded dim: ids -2 .. num_blocks + 1 land there
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


class Guarded:
    """A copy of `tensor` in the middle of a buffer GUARD entries wider on both sides of each of
    `dims` (default all), the margins (the guard) filled with `fill`."""

    def __init__(
        self, tensor: torch.Tensor, fill: float | int, dims: tuple[int, ...] | None = None
    ):
        dims = tuple(range(tensor.dim())) if dims is None else dims
        shape = [n + 2 * GUARD * (d in dims) for d, n in enumerate(tensor.shape)]
        index = tuple(
            slice(GUARD, GUARD + n) if d in dims else slice(None)
            for d, n in enumerate(tensor.shape)
        )
        self.buffer = torch.full(shape, fill, dtype=tensor.dtype)
        self.view = self.buffer[index]
        self.view.copy_(tensor)
        self._guard = torch.ones(shape, dtype=torch.bool)
        self._guard[index] = False
        self.fill = fill

    def intact(self) -> bool:
        guard = self.buffer[self._guard]
        if isinstance(self.fill, float) and math.isnan(self.fill):
            return bool(guard.isnan().all())
        return bool((guard == self.fill).all())


@pytest.fixture
def as_on_cuda(monkeypatch):
    """Launchers do not read the values of index tensors, as on CUDA: the kernels alone must
    stay inside their tensors. (raising=False: the same test runs on code without the hook.)"""
    monkeypatch.setattr(_checks, "checks_values", lambda device, backend: False, raising=False)


def guarded_problem(make_paged, seq_lens, q_lens, *, poison=True):
    """A fp32 paged problem whose pool, block tables, seq_lens (and query_start_loc) are guarded
    views; the block-table guard holds num_blocks, so a read past a row reads the pool's guard."""
    problem = make_paged(seq_lens, q_lens, 4, 2, 64, 8, F32, poison=poison)
    num_blocks = problem.pool.shape[0]
    guards = {
        "pool": Guarded(problem.pool, float("nan")),
        "block_tables": Guarded(problem.block_tables, num_blocks),
        "seq_lens": Guarded(problem.seq_lens, 1 << 20),
    }
    problem.pool = guards["pool"].view
    problem.block_tables = guards["block_tables"].view
    problem.seq_lens = guards["seq_lens"].view
    if q_lens is not None:
        guards["query_start_loc"] = Guarded(problem.query_start_loc, 1 << 20)
        problem.query_start_loc = guards["query_start_loc"].view
    return problem, guards


def assert_intact(guards):
    broken = [name for name, guard in guards.items() if not guard.intact()]
    assert not broken, f"written outside the tensors: guard of {broken}"


# ---- write_kv ------------------------------------------------------------------------------------


def bad_slot(kind, num_slots, block_size):
    return {
        "past-pool": num_slots,
        "two-blocks-past": num_slots + block_size + 1,
        "below-minus-one": -2,
        "wild": 1 << 40,
    }[kind]


@pytest.mark.parametrize("kind", ["past-pool", "below-minus-one", "wild"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_kv_rejects_out_of_range_slot(backend, kind):
    pool = Guarded(torch.zeros(4, 2, 8, 2, 64), float("nan"))
    before = pool.buffer.clone()
    key = torch.randn(3, 2, 64)
    slot = bad_slot(kind, 4 * 8, 8)
    slots = torch.tensor([3, slot, 7])
    with pytest.raises(
        ValueError, match=rf"slot_mapping\[1\] = {slot} is out of range .*\[0, 32\)"
    ):
        write_kv(key, key, pool.view[:, 0], pool.view[:, 1], slots, backend=backend)
    torch.testing.assert_close(pool.buffer, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dims", [(0,), None], ids=["guard-blocks", "guard-every-dim"])
@pytest.mark.parametrize("kind", ["past-pool", "two-blocks-past", "below-minus-one", "wild"])
def test_write_kv_kernel_skips_out_of_range_slot(as_on_cuda, kind, dims):
    num_blocks, bs = 4, 8
    pool = Guarded(torch.zeros(num_blocks, 2, bs, 2, 64), float("nan"), dims)
    expected = pool.view.clone()
    key = torch.randn(4, 2, 64)
    slots = torch.tensor([5, bad_slot(kind, num_blocks * bs, bs), -1, 2 * bs + 3])
    write_kv(key, key, pool.view[:, 0], pool.view[:, 1], slots, backend="triton")
    keep = torch.tensor([True, False, False, True])
    reference.write_kv(key[keep], key[keep], expected[:, 0], expected[:, 1], slots[keep])
    assert pool.intact(), "write_kv wrote outside the cache"
    assert torch.equal(pool.view, expected)


# ---- copy_blocks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 6, 1 << 40], ids=["minus-one", "num-blocks", "wild"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_blocks_rejects_out_of_range_block(backend, bad):
    pool = Guarded(torch.randn(6, 2, 2, 8, 2, 64), float("nan"))
    before = pool.buffer.clone()
    layers = range(2)
    mapping = torch.tensor([[1, 2], [3, bad]])
    match = rf"block_mapping\[1, 1\] = {bad} is out of range for a pool of 6 blocks"
    with pytest.raises(ValueError, match=match):
        copy_blocks(
            [pool.view[:, i, 0] for i in layers],
            [pool.view[:, i, 1] for i in layers],
            mapping,
            backend=backend,
        )
    torch.testing.assert_close(pool.buffer, before, rtol=0, atol=0, equal_nan=True)


BAD_PAIRS = [
    pytest.param(lambda n: [1, -1], id="dst-minus-one"),
    pytest.param(lambda n: [n, 3], id="src-num-blocks"),
    pytest.param(lambda n: [4, n + 1], id="dst-past"),
    pytest.param(lambda n: [-2, 5], id="src-negative"),
    pytest.param(lambda n: [0, 1 << 40], id="dst-wild"),
]


@pytest.mark.parametrize("pair", BAD_PAIRS)
@pytest.mark.parametrize("dims", [(0,), None], ids=["flat-blocks", "rowwise-every-dim"])
def test_copy_blocks_kernel_skips_out_of_range_pair(as_on_cuda, dims, pair):
    num_blocks = 6
    pool = Guarded(torch.randn(num_blocks, 2, 2, 8, 2, 64), float("nan"), dims)
    expected = pool.view.clone()
    expected[2] = expected[1]
    layers = range(2)
    copy_blocks(
        [pool.view[:, i, 0] for i in layers],
        [pool.view[:, i, 1] for i in layers],
        torch.tensor([[1, 2], pair(num_blocks)]),
        backend="triton",
    )
    assert pool.intact(), "copy_blocks wrote outside the caches"
    assert torch.equal(pool.view, expected), "a pair naming a block outside the pool was copied"


# ---- gather_kv -----------------------------------------------------------------------------------


def gather(problem, backend, **kwargs):
    return gather_kv(
        problem.key_cache,
        problem.value_cache,
        problem.block_tables,
        problem.seq_lens,
        backend=backend,
        **kwargs,
    )


def corrupt(problem, what):
    """Make one index value bad; returns the message expected from the launcher."""
    num_blocks, max_keys = problem.pool.shape[0], problem.block_tables.shape[1] * 8
    if what == "block-minus-one":
        problem.block_tables[1, 0] = -1
        return r"block_tables\[1, 0\] = -1 is out of range for a pool of \d+ blocks"
    if what == "block-num-blocks":
        problem.block_tables[1, 1] = num_blocks
        return rf"block_tables\[1, 1\] = {num_blocks} is out of range for a pool of {num_blocks}"
    if what == "seq-len-negative":
        problem.seq_lens[0] = -3
        return rf"seq_lens\[0\] = -3 is out of range \(expected 0 to {max_keys}"
    if what == "seq-len-past-table":
        problem.seq_lens[1] = max_keys + 1
        return rf"seq_lens\[1\] = {max_keys + 1} is out of range \(expected 0 to {max_keys}: "
    raise AssertionError(what)


CORRUPTIONS = ["block-minus-one", "block-num-blocks", "seq-len-negative", "seq-len-past-table"]


@pytest.mark.parametrize("what", CORRUPTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_kv_rejects_bad_index(make_paged, backend, what):
    problem, guards = guarded_problem(make_paged, [13, 20], None)
    match = corrupt(problem, what)
    with pytest.raises(ValueError, match=match):
        gather(problem, backend)
    assert_intact(guards)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_kv_rejects_num_tokens(make_paged, backend):
    problem, _ = guarded_problem(make_paged, [5, 8], None)
    with pytest.raises(ValueError, match=r"num_tokens = 3, expected sum\(seq_lens\) = 13"):
        gather(problem, backend, num_tokens=3)
    for bad in (True, -1, 13.0):
        with pytest.raises(ValueError, match=f"num_tokens must be an int >= 0 or None, got {bad}"):
            gather(problem, backend, num_tokens=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unread_table_entries_may_hold_anything(make_paged, backend):
    """Only the first cdiv(seq_len, block_size) entries of a row are read, and checked."""
    problem, guards = guarded_problem(make_paged, [37, 5], [6, 5])
    expected = attend(problem, "torch")
    problem.block_tables[1, 1:] = -1  # past sequence 1's one block
    problem.block_tables[0, -1] = 1 << 30  # sequence 0's padding column
    key, value = gather(problem, backend)
    assert torch.equal(key, problem.key) and torch.equal(value, problem.value)
    torch.testing.assert_close(attend(problem, backend), expected, rtol=2e-5, atol=2e-5)
    assert_intact(guards)


@pytest.mark.parametrize(
    "bad", [-1, "num_blocks", 1 << 30], ids=["minus-one", "num-blocks", "wild"]
)
def test_gather_kv_kernel_zeros_out_of_range_block(make_paged, as_on_cuda, bad):
    problem, guards = guarded_problem(make_paged, [13, 20], None)
    problem.block_tables[1, 1] = problem.pool.shape[0] if bad == "num_blocks" else bad
    key, value = gather(problem, "triton")
    expected_key, expected_value = problem.key.clone(), problem.value.clone()
    rows = slice(13 + 8, 13 + 16)  # sequence 1, positions 8..15: its block 1
    expected_key[rows] = 0
    expected_value[rows] = 0
    assert torch.equal(key, expected_key) and torch.equal(value, expected_value)
    assert_intact(guards)


def test_gather_kv_kernel_clamps_lengths(make_paged, as_on_cuda):
    """A seq_len past the table reads only what its row covers; a negative one reads nothing;
    a num_tokens short of the lengths cuts the output (written rows stay inside it)."""
    problem, guards = guarded_problem(make_paged, [13, 20], None, poison=False)
    max_keys = problem.block_tables.shape[1] * 8
    problem.seq_lens[0] = max_keys + 5
    problem.seq_lens[1] = -4
    key, value = gather(problem, "triton")
    clamped = torch.tensor([max_keys, 0], dtype=torch.int32)
    ref_key, ref_value = reference.gather_kv(
        problem.key_cache, problem.value_cache, problem.block_tables, clamped
    )
    assert torch.equal(key, ref_key) and torch.equal(value, ref_value)
    problem.seq_lens.copy_(torch.tensor([5, 8]))
    key, value = gather(problem, "triton", num_tokens=3)
    assert torch.equal(key, problem.key[:3]) and torch.equal(value, problem.value[:3])
    assert_intact(guards)


# ---- paged_attention -----------------------------------------------------------------------------


def attend(problem, backend, out=None, **kwargs):
    return paged_attention(
        problem.query,
        problem.key_cache,
        problem.value_cache,
        problem.block_tables,
        problem.seq_lens,
        scale=0.125,
        query_start_loc=problem.query_start_loc,
        out=out,
        backend=backend,
        **kwargs,
    )


def attend64(problem, **kwargs):
    """The float64 reference of `attend`."""
    return reference.paged_attention(
        problem.query.double(),
        problem.key_cache.double(),
        problem.value_cache.double(),
        problem.block_tables,
        problem.seq_lens,
        scale=0.125,
        query_start_loc=problem.query_start_loc,
        **kwargs,
    )


@pytest.mark.parametrize("q_lens", [None, [6, 9]], ids=["decode", "prefill"])
@pytest.mark.parametrize("what", CORRUPTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_rejects_bad_index(make_paged, backend, what, q_lens):
    problem, guards = guarded_problem(make_paged, [13, 20], q_lens)
    match = corrupt(problem, what)
    with pytest.raises(ValueError, match=match):
        attend(problem, backend)
    assert_intact(guards)


QSL_ERRORS = [
    pytest.param([0, 3, 9], r"query_start_loc runs from 0 to 9, expected 0 to 7", id="end-past-T"),
    pytest.param([0, 3, 5], r"query_start_loc runs from 0 to 5, expected 0 to 7", id="end-short"),
    pytest.param([2, 4, 7], r"query_start_loc runs from 2 to 7, expected 0 to 7", id="start-not-0"),
    pytest.param(
        [0, 5, 3, 7],
        r"query_start_loc\[2\] = 3 is less than query_start_loc\[1\] = 5",
        id="decreasing",
    ),
]


@pytest.mark.parametrize("qsl, match", QSL_ERRORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_attention_rejects_inconsistent_query_start_loc(make_paged, backend, qsl, match):
    num_seqs = len(qsl) - 1
    problem = make_paged([9, 12, 5][:num_seqs], [3, 4, 0][:num_seqs], 4, 2, 64, 8, F32)
    problem.query_start_loc = torch.tensor(qsl, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        attend(problem, backend)


@pytest.mark.parametrize(
    "bad",
    [-1, "num_blocks", "num_blocks+1", 1 << 30],
    ids=["minus-one", "num-blocks", "past", "wild"],
)
@pytest.mark.parametrize("q_lens", [None, [6, 20]], ids=["decode", "prefill"])
def test_paged_attention_kernel_masks_out_of_range_block(make_paged, as_on_cuda, q_lens, bad):
    """A block id outside the pool is not read: its keys and values load as zeros, as if the
    entry named a block of zeros."""
    problem, guards = guarded_problem(make_paged, [13, 20], q_lens)
    num_blocks = problem.pool.shape[0]
    bad = {"num_blocks": num_blocks, "num_blocks+1": num_blocks + 1}.get(bad, bad)
    owned = set(problem.block_tables.flatten().tolist())
    spare = min(set(range(num_blocks)) - owned)  # zeros in a block no sequence owns stand in
    problem.pool[spare] = 0  # for the bad block
    problem.block_tables[1, 1] = spare
    expected = attend64(problem)
    problem.block_tables[1, 1] = bad
    out = Guarded(torch.full_like(problem.query, float("nan")), float("nan"))
    attend(problem, "triton", out=out.view, config={"num_splits": 2, "block_n": 16})
    guards["out"] = out
    assert_intact(guards)
    assert not out.view.isnan().any(), "read outside the pool"
    torch.testing.assert_close(out.view.double(), expected, rtol=2e-5, atol=2e-5)


def test_paged_attention_kernel_clamps_lengths(make_paged, as_on_cuda):
    """Decode: a seq_len past the table sees only the keys its row covers; a negative one sees
    no key (zeros)."""
    problem, guards = guarded_problem(make_paged, [13, 20, 7], None, poison=False)
    max_keys = problem.block_tables.shape[1] * 8
    problem.seq_lens[1] = max_keys + 3
    problem.seq_lens[2] = -4
    out = attend(problem, "triton")
    problem.seq_lens[1] = max_keys
    problem.seq_lens[2] = 0
    torch.testing.assert_close(out.double(), attend64(problem), rtol=2e-5, atol=2e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert_intact(guards)


QSL_MASKED = [
    pytest.param([0, 3, 12], id="end-past-T"),
    pytest.param([0, 3, 5], id="end-short"),
    pytest.param([2, 4, 7], id="start-not-0"),
    pytest.param([-3, 2, 7], id="start-negative"),
    pytest.param([9, 10, 14], id="all-past-T"),
    pytest.param([0, 5, 3, 7], id="decreasing"),
]


@pytest.mark.parametrize("qsl", QSL_MASKED)
def test_paged_attention_kernel_masks_query_rows(make_paged, as_on_cuda, qsl):
    """Rows outside [0, T) are neither read nor written, whatever query_start_loc says; with
    non-decreasing offsets, the rows inside are those of the sequences that claim them."""
    num_seqs = len(qsl) - 1
    problem = make_paged([9, 12, 5][:num_seqs], [3, 4, 0][:num_seqs], 4, 2, 64, 8, F32)
    num_tokens = problem.query.shape[0]
    query = Guarded(problem.query, float("nan"))
    out = Guarded(torch.full_like(problem.query, float("nan")), float("nan"))
    problem.query = query.view
    problem.query_start_loc = torch.tensor(qsl, dtype=torch.int32)
    attend(problem, "triton", out=out.view, config={"block_m": 16})
    assert query.intact() and out.intact(), "wrote outside query or out"
    if any(b < a for a, b in zip(qsl, qsl[1:])):
        return  # the rows a sequence gets are unspecified, but stay inside
    # Expected: the reference on the claimed rows, packed (rows outside [0, T) as zeros).
    q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    rows = torch.cat([torch.arange(a, b) for a, b in zip(qsl, qsl[1:])])
    inside = (rows >= 0) & (rows < num_tokens)
    packed = torch.zeros(len(rows), *problem.query.shape[1:])
    packed[inside] = problem.query[rows[inside]]
    problem.query = packed
    problem.query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0)], dtype=torch.int32)
    expected = attend64(problem)[inside]
    torch.testing.assert_close(out.view[rows[inside]].double(), expected, rtol=2e-5, atol=2e-5)
    unclaimed = torch.ones(num_tokens, dtype=torch.bool)
    unclaimed[rows[inside]] = False
    assert out.view[unclaimed].isnan().all(), "a row no sequence claims was written"


@pytest.mark.parametrize(
    "fill",
    [-1, "num_blocks", 1 << 30, "nan-block"],
    ids=["minus-one", "num-blocks", "wild", "nan-block"],
)
@pytest.mark.parametrize("q_lens", [None, [6, 20]], ids=["decode", "prefill"])
def test_paged_attention_kernel_skips_released_blocks(make_paged, as_on_cuda, q_lens, fill):
    """Sliding window: the entries of blocks before every query's window (released by a
    sliding KV group) are not read, whatever they hold (nan-block: a released, NaN block)."""
    problem, guards = guarded_problem(make_paged, [43, 36], q_lens)
    num_blocks, first_block = problem.pool.shape[0], int(problem.block_tables[0, 0])
    fill = {"num_blocks": num_blocks, "nan-block": first_block}.get(fill, fill)
    assert problem.release_out_of_window(5, fill=fill) >= 4
    out = attend(problem, "triton", sliding_window=5, config={"num_splits": 2, "block_n": 16})
    assert_intact(guards)
    assert not out.isnan().any(), "a released block was read"
    expected = oracle_attention(problem, scale=0.125, sliding_window=5)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)
