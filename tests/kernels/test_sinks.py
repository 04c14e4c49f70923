"""paged_attention with attention sinks (``sinks=``, gpt-oss ``s_aux``).

Each query row of head h takes one more logit sinks[h] into its softmax and drops that
probability. The Triton kernel (interpreted; fp16/fp32, the interpreter computes bf16 `tl.dot`
wrongly) is held to the torch reference in float64, and the reference to the float64 oracle,
written as transformers' gpt-oss eager attention (cat the sink column, softmax, drop it), with
every other rule (GQA, causal, sliding window, softcap, split-K, prefill over a cached prefix).
Caches are NaN-poisoned outside written slots.
"""

from __future__ import annotations

import pytest
import torch

from pagedkv.kernels import trace_backends
from pagedkv.kernels.testing import oracle_attention

F16, F32 = torch.float16, torch.float32
TOLERANCES = {F32: 2e-5, F16: 3e-3}  # Triton vs the float64 reference, as in test_attention.py
ORACLE_TOLERANCES = {F32: 1e-5, F16: 2e-3}  # the reference in the input dtype vs the oracle


def make_sinks(num_q_heads, seed=0):
    """Sinks around the scores' own scale (q.k * scale ~ N(0, 1)), so they matter."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(num_q_heads, generator=gen) * 2 + 1


CASES = [
    # seq_lens, q_lens (None = decode), Hq, Hkv, D, bs, dtype, kwargs
    pytest.param([1, 16, 37], None, 8, 2, 64, 16, F16, {}, id="decode-B3-gqa4-fp16"),
    pytest.param([9, 24], None, 4, 4, 80, 8, F32, {}, id="decode-D80-fp32"),
    pytest.param([100, 7], None, 8, 2, 64, 16, F16, {"config": {"num_splits": 4}},
                 id="decode-splitK4"),
    pytest.param([70, 3, 1], None, 4, 1, 80, 8, F32,
                 {"config": {"num_splits": 3, "block_n": 16}}, id="decode-splitK3-MQA"),
    pytest.param([50, 20], None, 4, 2, 64, 16, F32, {"sliding_window": 9}, id="decode-window9"),
    pytest.param([60, 20], None, 4, 2, 64, 8, F16,
                 {"sliding_window": 16, "config": {"num_splits": 3, "block_n": 16}},
                 id="decode-window16-splitK3"),
    pytest.param([45, 2], None, 4, 2, 64, 16, F32, {"softcap": 4.0}, id="decode-softcap4"),
    pytest.param([0, 5, 0], None, 4, 2, 64, 8, F32, {"config": {"num_splits": 2, "block_n": 16}},
                 id="decode-empty-sequences-splitK2"),
    pytest.param([17, 1, 32], [17, 1, 32], 8, 2, 64, 16, F16, {}, id="prefill-B3-gqa4"),
    # every row a whole sequence of one length: the reference's plain-prefill shortcut
    pytest.param([24, 24], [24, 24], 4, 2, 64, 8, F32, {}, id="prefill-equal-lengths"),
    pytest.param([19], [19], 4, 2, 64, 8, F16, {}, id="prefill-one-sequence"),
    pytest.param([20, 33, 16], [4, 1, 16], 8, 2, 128, 32, F16, {}, id="prefix-D128-bs32"),
    pytest.param([40, 12], [9, 5], 4, 4, 96, 16, F32, {"config": {"block_m": 16}},
                 id="prefix-D96-many-qblocks"),
    pytest.param([30, 21], [30, 6], 4, 2, 64, 16, F32,
                 {"config": {"num_splits": 2, "block_n": 16}}, id="prefix-splitK2"),
    pytest.param([30, 9], [11, 9], 4, 2, 64, 8, F32, {"sliding_window": 4}, id="prefix-window4"),
    pytest.param([25, 12], [25, 4], 4, 2, 64, 16, F16, {"softcap": 3.0, "sliding_window": 7},
                 id="prefill-softcap-window-fp16"),
    pytest.param([12, 7], [12, 3], 2, 1, 64, 16, F32, {"causal": False}, id="noncausal"),
    pytest.param([3, 5], [6, 7], 4, 2, 64, 8, F32, {}, id="qlen-gt-seqlen-zero-rows"),
    pytest.param([2, 6], [5, 6], 4, 2, 64, 8, F16,
                 {"config": {"block_m": 16, "num_splits": 2, "block_n": 16}},
                 id="qlen-gt-seqlen-splitK2"),
]  # fmt: skip


@pytest.mark.parametrize("seq_lens, q_lens, hq, hkv, d, bs, dtype, kwargs", CASES)
def test_kernel_matches_reference(make_paged, seq_lens, q_lens, hq, hkv, d, bs, dtype, kwargs):
    problem = make_paged(seq_lens, q_lens, hq, hkv, d, bs, dtype)
    sinks = make_sinks(hq)
    with trace_backends() as calls:
        out = problem.attend("triton", sinks=sinks, **kwargs)
    assert calls == [("paged_attention", "triton")]
    expected = problem.attend("float64", sinks=sinks, **kwargs)
    assert out.dtype == dtype and not out.isnan().any()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    # the sinks matter: without them the result differs
    assert not torch.allclose(expected, problem.attend("float64", **kwargs), atol=0.01)


@pytest.mark.parametrize("seq_lens, q_lens, hq, hkv, d, bs, dtype, kwargs", CASES)
def test_reference_matches_oracle(make_paged, seq_lens, q_lens, hq, hkv, d, bs, dtype, kwargs):
    problem = make_paged(seq_lens, q_lens, hq, hkv, d, bs, dtype)
    sinks = make_sinks(hq)
    kwargs = {k: v for k, v in kwargs.items() if k != "config"}
    with trace_backends() as calls:
        out = problem.attend("torch", sinks=sinks, **kwargs)
    assert calls == [("paged_attention", "torch")]
    expected = oracle_attention(problem, scale=d**-0.5, sinks=sinks, **kwargs)
    assert out.dtype == dtype and not out.isnan().any()
    tol = ORACLE_TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "config", [{}, {"num_splits": 3, "block_n": 16}], ids=["one-pass", "splitK3"]
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rows_that_see_no_key_are_exact_zeros(make_paged, backend, config):
    """The sink holds all of such a row's probability: empty sequences, left padding
    (q_len > seq_len) and rows whose every key is an invalid slot output exactly 0."""
    sinks = make_sinks(4)
    problem = make_paged([0, 9, 0], None, 4, 2, 64, 8, F32)
    out = problem.attend(backend, sinks=sinks, config=config)
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
    assert (out[1].abs().sum(-1) > 0).all()

    problem = make_paged([3, 20], [6, 20], 4, 2, 64, 8, F32)
    valid = problem.slot_valid({1: range(2)})  # sequence 1's first two queries see holes only
    out = problem.attend(backend, sinks=sinks, slot_valid=valid, config=config)
    zero_rows = [0, 1, 2, 6, 7]  # positions -3, -2, -1 of sequence 0; 0, 1 of sequence 1
    assert torch.equal(out[zero_rows], torch.zeros_like(out[zero_rows]))
    assert (out[[3, 4, 5, *range(8, 26)]].abs().sum(-1) > 0).all()
    expected = oracle_attention(problem, scale=0.125, sinks=sinks, slot_valid=valid)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "config", [{}, {"num_splits": 3, "block_n": 16}], ids=["one-pass", "splitK3"]
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extreme_sinks(make_paged, backend, config):
    """A sink of -inf is no sink (rows that see no key stay 0, not NaN); a sink far below every
    score takes no probability; one far above takes nearly all of it."""
    problem = make_paged([40, 0, 7], None, 4, 2, 64, 8, F32)
    plain = problem.attend(backend, config=config)
    no_sink = torch.full((4,), float("-inf"))
    torch.testing.assert_close(problem.attend(backend, sinks=no_sink, config=config), plain)
    low = torch.full((4,), -200.0)
    torch.testing.assert_close(problem.attend(backend, sinks=low, config=config), plain)
    high = torch.tensor([60.0, 0.0, 60.0, 0.0])  # heads 0 and 2 only
    out = problem.attend(backend, sinks=high, config=config)
    assert out[:, [0, 2]].abs().max() < 1e-20 and (out[[0, 2]][:, [1, 3]].abs().sum(-1) > 0).all()
    expected = oracle_attention(problem, scale=0.125, sinks=high)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sink_dtypes_and_strides(make_paged, backend):
    """Any float dtype (used in fp32) and any stride give the fp32 result: the values here are
    exact in bfloat16."""
    problem = make_paged([37, 20], [5, 20], 8, 2, 64, 8, F16)
    sinks = make_sinks(8).to(torch.bfloat16).float()
    expected = problem.attend(backend, sinks=sinks)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        torch.testing.assert_close(problem.attend(backend, sinks=sinks.to(dtype)), expected)
    wide = torch.full((3 * 8,), float("nan"))
    wide[1::3] = sinks
    torch.testing.assert_close(problem.attend(backend, sinks=wide[1::3]), expected)
