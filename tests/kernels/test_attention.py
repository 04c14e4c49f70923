"""paged_attention: the real Triton kernel (interpreted on CPU) against the torch reference.

Attention runs in fp16/fp32 here: the interpreter computes bf16 `tl.dot` wrongly. The reference
runs in float64 on the same (rounded) inputs; tolerances travel with the dtype. Caches are
NaN-poisoned outside written slots (see conftest), so any stray read shows up as NaN.
"""

from __future__ import annotations

import pytest
import torch

from pagedkv.kernels import paged_attention, reference, trace_backends

# fp32 runs a true fp32 dot; fp16 rounds P to fp16 before P @ V and rounds the output.
TOLERANCES = {torch.float32: 2e-5, torch.float16: 3e-3}


def run_triton(problem, **kwargs):
    return paged_attention(
        problem.query,
        problem.key_cache,
        problem.value_cache,
        problem.block_tables,
        problem.seq_lens,
        query_start_loc=problem.query_start_loc,
        backend="triton",
        **kwargs,
    )


def run_reference64(problem, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k not in ("config", "out")}
    return reference.paged_attention(
        problem.query.double(),
        problem.key_cache.double(),
        problem.value_cache.double(),
        problem.block_tables,
        problem.seq_lens,
        query_start_loc=problem.query_start_loc,
        **kwargs,
    )


def check(problem, **kwargs):
    head_dim = problem.query.shape[-1]
    kwargs.setdefault("scale", head_dim**-0.5)
    with trace_backends() as calls:
        out = run_triton(problem, **kwargs)
    assert calls == [("paged_attention", "triton")]
    expected = run_reference64(problem, **kwargs)
    assert out.dtype == problem.query.dtype and out.shape == problem.query.shape
    assert not out.isnan().any(), "NaN in output: a poisoned slot was read"
    tol = TOLERANCES[problem.query.dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    return out


F16, F32 = torch.float16, torch.float32

DECODE_CASES = [
    # seq_lens, Hq, Hkv, D, bs, dtype, kwargs
    pytest.param([1, 16, 37], 8, 2, 64, 16, F16, {}, id="B3-Hq8-Hkv2-D64-bs16-fp16"),
    pytest.param([9, 24], 4, 4, 80, 8, F32, {}, id="B2-Hq4-Hkv4-D80-bs8-fp32"),
    pytest.param([33, 64, 5, 1], 8, 1, 96, 32, F16, {}, id="B4-Hq8-Hkv1-D96-bs32-MQA"),
    pytest.param([40, 17], 16, 2, 128, 16, F16, {}, id="B2-Hq16-Hkv2-D128-bs16-gqa8"),
    pytest.param([40], 2, 1, 256, 16, F32, {}, id="B1-Hq2-Hkv1-D256-bs16-fp32"),
    pytest.param([13, 30], 6, 2, 64, 8, F16, {}, id="B2-Hq6-Hkv2-D64-bs8-gqa3"),
    pytest.param([32, 8], 4, 2, 64, 8, F32, {}, id="B2-exact-block-multiples"),
    pytest.param(
        [100, 7], 8, 2, 64, 16, F16, {"config": {"num_splits": 4}}, id="B2-splitK4-D64-bs16"
    ),
    pytest.param(
        [70, 3, 1],
        4,
        1,
        80,
        8,
        F32,
        {"config": {"num_splits": 3, "block_n": 16}},
        id="B3-splitK3-D80-bs8-bn16",
    ),
    pytest.param([50, 20], 4, 2, 64, 16, F32, {"sliding_window": 9}, id="B2-window9"),
    pytest.param(
        [50, 20],
        4,
        2,
        64,
        16,
        F16,
        {"sliding_window": 16, "config": {"num_splits": 3, "block_n": 16}},
        id="B2-window16-splitK3",
    ),
    pytest.param([45, 2], 4, 2, 64, 16, F32, {"softcap": 4.0}, id="B2-softcap4"),
    pytest.param([30], 4, 4, 64, 32, F16, {"config": {"block_n": 16}}, id="B1-bs32-bn16"),
    pytest.param([30, 11], 4, 2, 64, 8, F16, {"config": {"block_n": 64}}, id="B2-bs8-bn64"),
]


@pytest.mark.parametrize("seq_lens, hq, hkv, d, bs, dtype, kwargs", DECODE_CASES)
def test_decode(make_paged, seq_lens, hq, hkv, d, bs, dtype, kwargs):
    check(make_paged(seq_lens, None, hq, hkv, d, bs, dtype), **kwargs)


PREFILL_CASES = [
    # seq_lens, q_lens, Hq, Hkv, D, bs, dtype, kwargs
    pytest.param([17, 1, 32], [17, 1, 32], 8, 2, 64, 16, F16, {}, id="B3-T50-Hq8-Hkv2-D64-bs16"),
    pytest.param([24, 9], [24, 9], 4, 1, 80, 8, F32, {}, id="B2-T33-Hq4-Hkv1-D80-bs8"),
    pytest.param([19], [19], 2, 2, 256, 16, F16, {}, id="B1-T19-Hq2-Hkv2-D256-bs16"),
    pytest.param(
        [20, 33, 16], [4, 1, 16], 8, 2, 128, 32, F16, {}, id="prefix-B3-T21-Hq8-Hkv2-D128-bs32"
    ),
    pytest.param(
        [40, 12],
        [9, 5],
        4,
        4,
        96,
        16,
        F32,
        {"config": {"block_m": 16}},
        id="prefix-B2-T14-D96-bm16-many-qblocks",
    ),
    pytest.param(
        [26, 1, 18], [26, 1, 5], 8, 1, 64, 8, F16, {"config": {"block_m": 32}}, id="B3-T32-MQA-bm32"
    ),
    pytest.param(
        [30, 21],
        [30, 6],
        4,
        2,
        64,
        16,
        F32,
        {"config": {"num_splits": 2, "block_n": 16}},
        id="prefix-B2-splitK2",
    ),
    pytest.param([30, 9], [11, 9], 4, 2, 64, 8, F32, {"sliding_window": 4}, id="B2-window4"),
    pytest.param([25, 3], [6, 3], 4, 1, 64, 16, F32, {"softcap": 5.0}, id="B2-softcap5"),
    pytest.param(
        [25, 12],
        [25, 4],
        4,
        2,
        64,
        16,
        F16,
        {"softcap": 3.0, "sliding_window": 7},
        id="B2-softcap-window-fp16",
    ),
    pytest.param([12, 7], [12, 3], 2, 1, 64, 16, F32, {"causal": False}, id="B2-noncausal"),
    pytest.param([3, 5], [6, 7], 4, 2, 64, 8, F32, {}, id="qlen-gt-seqlen-zero-rows"),
    pytest.param(
        [2, 6],
        [5, 6],
        4,
        2,
        64,
        8,
        F16,
        {"config": {"block_m": 16, "num_splits": 2, "block_n": 16}},
        id="qlen-gt-seqlen-splitK",
    ),
]


@pytest.mark.parametrize("seq_lens, q_lens, hq, hkv, d, bs, dtype, kwargs", PREFILL_CASES)
def test_prefill(make_paged, seq_lens, q_lens, hq, hkv, d, bs, dtype, kwargs):
    check(make_paged(seq_lens, q_lens, hq, hkv, d, bs, dtype), **kwargs)


def test_zero_rows_are_exact_zeros(make_paged):
    problem = make_paged([2, 4], [5, 4], 4, 2, 64, 8, F32)
    out = check(problem)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))  # positions -3, -2, -1
    assert (out[3:].abs().sum(-1) > 0).all()


def test_empty_sequence_in_batch(make_paged):
    """A sequence with no queries (q_len 0) is skipped by the q-block search."""
    problem = make_paged([5, 9, 4], [3, 2, 4], 4, 2, 64, 8, F32)
    problem.query_start_loc = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    problem.query = problem.query[:7]
    problem.seq_lens = torch.tensor([5, 9, 4], dtype=torch.int32)
    check(problem)


@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-pass", "splitK3"])
def test_out_argument_and_strided_query(make_paged, num_splits):
    problem = make_paged([10, 21], [4, 3], 4, 2, 64, 8, F32)
    wide = torch.randn(7, 4, 2 * 64)
    wide[:, :, :64] = problem.query
    problem.query = wide[:, :, :64]  # non-contiguous: stride 128 between heads
    out_storage = torch.full((7, 4, 3, 64), float("nan"))
    out = out_storage[:, :, 1]
    result = check(problem, out=out, config={"num_splits": num_splits, "block_n": 32})
    assert result is out
    assert out_storage[:, :, [0, 2]].isnan().all()


def test_int64_block_tables_and_seq_lens(make_paged):
    problem = make_paged([12, 3], None, 4, 2, 64, 8, F32)
    problem.block_tables = problem.block_tables.long()
    problem.seq_lens = problem.seq_lens.long()
    check(problem)


def test_empty_batch():
    query = torch.empty(0, 4, 64)
    cache = torch.empty(3, 8, 2, 64)
    out = paged_attention(
        query,
        cache,
        cache,
        torch.zeros(0, 1, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        scale=0.125,
        backend="triton",
    )
    assert out.shape == (0, 4, 64)


BLOCK_SIZE_CASES = [
    # every natural block size: a KV tile spans many pages (bs 1, 2, 4) or part of one (bs 128)
    pytest.param(bs, id=f"bs{bs}")
    for bs in (1, 2, 4, 64, 128)
]


@pytest.mark.parametrize("bs", BLOCK_SIZE_CASES)
def test_block_sizes(make_paged, bs):
    problem = make_paged([37, 5], [6, 5], 4, 2, 64, bs, F32)
    check(problem, config={"block_n": 32})


def test_mqa_group_wider_than_default_tile(make_paged):
    """Hq 32 / Hkv 1: the 32-head group alone exceeds the default 16-row decode tile."""
    check(make_paged([20, 9], None, 32, 1, 64, 16, F16))
    check(make_paged([20, 9], [7, 9], 32, 1, 64, 16, F16, seed=1))


def test_layer_of_a_multi_layer_pool(make_paged):
    """Layer 0 of a `[num_blocks, 3 layers, 2, bs, Hkv, D]` pool: the layout kvcache serves."""
    check(make_paged([37, 5], None, 4, 2, 64, 8, F32, num_layers=3))
    check(make_paged([37, 5], [6, 5], 4, 2, 64, 8, F16, num_layers=3))


def test_empty_sequences_output_zeros(make_paged):
    problem = make_paged([0, 5, 0], None, 4, 2, 64, 8, F32)
    out = check(problem)
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))


@pytest.mark.parametrize("seed", range(8), ids=lambda s: f"seed{s}")
def test_random_mixes(make_paged, seed):
    """Random batches mixing decode-like (q_len 1), prefill and prefix rows, left padding
    (q_len > seq_len) and random configs: each seed draws one problem."""
    gen = torch.Generator().manual_seed(100 + seed)

    def draw(*choices):
        return choices[int(torch.randint(len(choices), (1,), generator=gen))]

    hkv, group = draw(1, 2, 4), draw(1, 3, 4, 8)
    d, bs = draw(64, 80, 96, 128), draw(4, 8, 16, 32)
    seq_lens = torch.randint(1, 60, (int(torch.randint(1, 5, (1,), generator=gen)),),
                             generator=gen).tolist()  # fmt: skip
    q_lens = [draw(1, s, max(1, s // 3), s + 2) for s in seq_lens]
    kwargs = {"config": {"block_n": draw(16, 32, 64), "block_m": draw(16, 32, 64),
                         "num_splits": draw(1, 2, 3)}}  # fmt: skip
    if draw(True, False):
        kwargs["sliding_window"] = draw(1, 5, 17)
    if draw(True, False):
        kwargs["softcap"] = draw(3.0, 30.0)
    problem = make_paged(seq_lens, q_lens, hkv * group, hkv, d, bs, draw(F16, F32), seed=seed)
    check(problem, **kwargs)
