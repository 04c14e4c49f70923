"""paged_attention with a sliding window over block tables whose released blocks are absent.

A sliding KV group releases a sequence's blocks that lie wholly before the window of every
query of the step and sets their block-table entries to -1. `PagedProblem.release_out_of_window`
does that to a test problem and NaN-poisons the released blocks, so an op that indexes the pool
with -1 fails and one that reads a released block returns NaN. The Triton kernel (interpreted;
fp16/fp32, the interpreter computes bf16 `tl.dot` wrongly) is held to the torch reference in
float64, and the reference to the float64 oracle, which never reads the cache.
"""

from __future__ import annotations

import pytest
import torch

from pagedkv.kernels import trace_backends
from pagedkv.kernels.testing import oracle_attention

F16, F32 = torch.float16, torch.float32
TOLERANCES = {F32: 2e-5, F16: 3e-3}  # Triton vs the float64 reference, as in test_attention.py
ORACLE_TOLERANCES = {F32: 1e-5, F16: 2e-3}  # the reference in the input dtype vs the oracle

CASES = [
    # seq_lens, q_lens (None = decode), Hq, Hkv, D, bs, dtype, window, kwargs
    pytest.param([50, 20, 3], None, 4, 2, 64, 8, F32, 9, {}, id="decode-W9-bs8-gqa2"),
    pytest.param([70, 33], None, 8, 2, 64, 16, F16, 5, {}, id="decode-W5-below-bs16-gqa4"),
    pytest.param([40, 21], None, 4, 4, 64, 1, F32, 6, {}, id="decode-W6-bs1"),
    pytest.param([80, 9], None, 16, 2, 64, 32, F16, 33, {"config": {"block_n": 16}},
                 id="decode-W33-bs32-bn16-gqa8"),
    pytest.param([100, 45], None, 8, 2, 64, 8, F16, 20,
                 {"config": {"num_splits": 4, "block_n": 16}}, id="decode-W20-splitK4"),
    pytest.param([90, 2], None, 4, 1, 80, 16, F32, 17,
                 {"config": {"num_splits": 3, "block_n": 32}}, id="decode-W17-splitK3-D80-MQA"),
    pytest.param([40, 12], None, 4, 2, 64, 4, F32, 100, {}, id="decode-W-past-seq"),
    pytest.param([60, 30], [10, 4], 4, 2, 64, 8, F32, 11, {}, id="prefix-W11-bs8"),
    pytest.param([75, 41], [20, 1], 8, 2, 64, 16, F16, 6, {"config": {"block_m": 32}},
                 id="prefix-W6-below-bs16-many-qblocks"),
    pytest.param([50, 29], [9, 3], 4, 1, 96, 4, F32, 13,
                 {"config": {"num_splits": 2, "block_n": 16}}, id="prefix-W13-bs4-splitK2-MQA"),
    pytest.param([55, 18], [6, 18], 4, 2, 64, 8, F16, 10, {"softcap": 5.0},
                 id="prefix-and-prefill-W10-softcap"),
    pytest.param([40, 25], [40, 25], 4, 2, 64, 8, F32, 7, {}, id="prefill-W7-nothing-released"),
    pytest.param([48, 20], [5, 7], 4, 2, 64, 16, F32, 200, {}, id="prefix-W-past-seq"),
    pytest.param([30, 5], [8, 9], 4, 2, 64, 8, F32, 4, {}, id="qlen-gt-seqlen-W4"),
    pytest.param([45, 30], [3, 2], 4, 2, 64, 8, F32, 12, {"causal": False}, id="noncausal-W12"),
]  # fmt: skip


def released_problem(make_paged, seq_lens, q_lens, hq, hkv, d, bs, dtype, window, fill=-1):
    problem = make_paged(seq_lens, q_lens, hq, hkv, d, bs, dtype)
    released = problem.release_out_of_window(window, fill=fill)
    firsts = [s - q for s, q in zip(seq_lens, problem.q_lens, strict=True)]
    assert (released > 0) == any(p - window + 1 >= bs for p in firsts)
    return problem


@pytest.mark.parametrize("seq_lens, q_lens, hq, hkv, d, bs, dtype, window, kwargs", CASES)
def test_kernel_skips_released_blocks(
    make_paged, seq_lens, q_lens, hq, hkv, d, bs, dtype, window, kwargs
):
    problem = released_problem(make_paged, seq_lens, q_lens, hq, hkv, d, bs, dtype, window)
    with trace_backends() as calls:
        out = problem.attend("triton", sliding_window=window, **kwargs)
    assert calls == [("paged_attention", "triton")]
    expected = problem.attend("float64", sliding_window=window, **kwargs)
    assert not expected.isnan().any(), "the reference read a released block"
    assert not out.isnan().any(), "NaN in output: a released block was read"
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("seq_lens, q_lens, hq, hkv, d, bs, dtype, window, kwargs", CASES)
def test_reference_skips_released_blocks(
    make_paged, seq_lens, q_lens, hq, hkv, d, bs, dtype, window, kwargs
):
    problem = released_problem(make_paged, seq_lens, q_lens, hq, hkv, d, bs, dtype, window)
    kwargs = {k: v for k, v in kwargs.items() if k != "config"}
    with trace_backends() as calls:
        out = problem.attend("torch", sliding_window=window, **kwargs)
    assert calls == [("paged_attention", "torch")]
    expected = oracle_attention(problem, scale=d**-0.5, sliding_window=window, **kwargs)
    assert out.dtype == dtype and not out.isnan().any(), "a released block was read"
    tol = ORACLE_TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


FILLS = [
    pytest.param("nan-block", id="nan-block"),  # a valid id of a NaN block (released, reused)
    pytest.param(1 << 30, id="wild"),
    pytest.param("num_blocks", id="num-blocks"),
]


@pytest.mark.parametrize("q_lens, config", [
    pytest.param(None, {"num_splits": 2, "block_n": 32}, id="decode-splitK2"),
    pytest.param([7, 3], {"block_n": 32}, id="prefix"),
])  # fmt: skip
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_released_entries_may_hold_anything(make_paged, backend, fill, q_lens, config):
    """Entries of released blocks are not read: any value there is accepted and ignored. The
    first released block of sequence 0 stands in for a NaN block a table may still name."""
    problem = make_paged([53, 38], q_lens, 4, 2, 64, 4, F32)
    num_blocks = problem.pool.shape[0]
    nan_block = int(problem.block_tables[0, 0])
    fill = {"nan-block": nan_block, "num_blocks": num_blocks}.get(fill, fill)
    assert problem.release_out_of_window(11, fill=fill) > 4
    out = problem.attend(backend, sliding_window=11, config=config)
    assert not out.isnan().any(), "a released entry was read"
    expected = oracle_attention(problem, scale=0.125, sliding_window=11)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("q_lens, first_read", [
    # sequence 1 (seq_len 38, bs 4, window 11): its first query's window starts at key
    # 38 - q_len - 11 + 1, in block first_read
    pytest.param(None, 6, id="decode"),  # key 27
    pytest.param([7, 3], 6, id="prefix"),  # key 25: blocks before 6 are released, 6 is read
    pytest.param([7, 6], 5, id="prefix-longer"),  # key 22: block 5 is read by the first query
])  # fmt: skip
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_minus_one_in_a_read_entry_is_rejected(make_paged, backend, q_lens, first_read):
    problem = make_paged([53, 38], q_lens, 4, 2, 64, 4, F32)

    def match(col):
        return rf"block_tables\[1, {col}\] = -1 is out of range for a pool of \d+ blocks"

    problem.block_tables[1, first_read - 1] = -1  # released: accepted
    problem.attend(backend, sliding_window=11)
    problem.block_tables[1, first_read] = -1
    with pytest.raises(ValueError, match=match(first_read)):
        problem.attend(backend, sliding_window=11)
    problem.block_tables[1, first_read] = 1
    with pytest.raises(ValueError, match=match(first_read - 1)):  # no window: every entry read
        problem.attend(backend)


@pytest.mark.parametrize("q_lens", [None, [7, 3]], ids=["decode", "prefix"])
def test_released_blocks_with_holes(make_paged, q_lens):
    """slot_valid= over a table with released blocks: holes (NaN) inside the window and in the
    released blocks; Triton, the torch backend and the oracle agree."""
    problem = make_paged([53, 38], q_lens, 4, 2, 64, 4, F16)
    valid = problem.slot_valid({0: [2, 45, 46, 51], 1: [0, 30, 31, 32, 33, 34, 35]})
    problem.release_out_of_window(11)
    tol = TOLERANCES[F16]
    out = problem.attend("triton", sliding_window=11, slot_valid=valid)
    expected = problem.attend("float64", sliding_window=11, slot_valid=valid)
    assert not out.isnan().any() and not expected.isnan().any()
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    tol = ORACLE_TOLERANCES[F16]
    out = problem.attend("torch", sliding_window=11, slot_valid=valid)
    expected = oracle_attention(problem, scale=0.125, sliding_window=11, slot_valid=valid)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
