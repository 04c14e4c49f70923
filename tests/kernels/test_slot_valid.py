"""paged_attention's per-slot validity mask (``slot_valid=``): the real Triton kernel (interpreted)
against the torch reference in float64, with every other rule (causal, sliding window, softcap,
GQA, split-K, prefill over a cached prefix).

Invalid slots ("holes") are NaN-poisoned in both caches (`PagedProblem.slot_valid`), so a kernel
that reads one returns NaN. fp16/fp32 only: the interpreter computes bf16 `tl.dot` wrongly.
"""

from __future__ import annotations

import pytest
import torch

from pagedkv.kernels import paged_attention, reference, trace_backends

F16, F32 = torch.float16, torch.float32
TOLERANCES = {F32: 2e-5, F16: 3e-3}  # as in test_attention.py


def run(problem, slot_valid, backend="triton", **kwargs):
    return paged_attention(
        problem.query,
        problem.key_cache,
        problem.value_cache,
        problem.block_tables,
        problem.seq_lens,
        scale=problem.query.shape[-1] ** -0.5,
        query_start_loc=problem.query_start_loc,
        slot_valid=slot_valid,
        backend=backend,
        **kwargs,
    )


def check(problem, slot_valid, **kwargs):
    with trace_backends() as calls:
        out = run(problem, slot_valid, **kwargs)
    assert calls == [("paged_attention", "triton")]
    kwargs.pop("config", None)
    expected = reference.paged_attention(
        problem.query.double(),
        problem.key_cache.double(),
        problem.value_cache.double(),
        problem.block_tables,
        problem.seq_lens,
        scale=problem.query.shape[-1] ** -0.5,
        query_start_loc=problem.query_start_loc,
        slot_valid=slot_valid,
        **kwargs,
    )
    assert not expected.isnan().any(), "the reference read an invalid slot"
    assert not out.isnan().any(), "NaN in output: an invalid (poisoned) slot was read"
    tol = TOLERANCES[problem.query.dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    return out


CASES = [
    # seq_lens, q_lens (None = decode), Hq, Hkv, D, bs, dtype, holes {seq: positions}, kwargs
    pytest.param(
        [37, 20], None, 8, 2, 64, 8, F16, {0: [5, 6, 20], 1: [0, 19]}, {}, id="decode-holes-gqa4"
    ),
    pytest.param(
        [40, 17],
        None,
        4,
        2,
        64,
        8,
        F32,
        {0: range(6, 19), 1: range(7, 9)},
        {},
        id="decode-holes-across-blocks",
    ),
    pytest.param(
        [100, 7],
        None,
        8,
        2,
        64,
        16,
        F16,
        {0: range(0, 40), 1: [6]},
        {"config": {"num_splits": 4, "block_n": 16}},
        id="decode-splitK4-a-split-all-invalid",
    ),
    pytest.param(
        [33, 5], None, 8, 1, 96, 32, F16, {0: [31, 32], 1: range(5)}, {}, id="decode-MQA-row-zeros"
    ),
    pytest.param(
        [24, 9],
        [24, 9],
        4,
        1,
        64,
        8,
        F32,
        {0: [0, 1, 12, 13, 14, 15, 16], 1: [8]},
        {},
        id="prefill-causal-first-row-zeros",
    ),
    pytest.param(
        [40, 12],
        [9, 5],
        4,
        4,
        96,
        16,
        F32,
        {0: range(10, 35), 1: range(0, 7)},
        {"config": {"block_m": 16}},
        id="prefix-holes-in-cached-part",
    ),
    pytest.param(
        [30, 9],
        [11, 9],
        4,
        2,
        64,
        8,
        F32,
        {0: range(17, 24), 1: [2]},
        {"sliding_window": 4},
        id="window4-rows-see-only-holes",
    ),
    pytest.param(
        [25, 3], [6, 3], 4, 1, 64, 16, F32, {0: [2, 23], 1: [1]}, {"softcap": 5.0}, id="softcap5"
    ),
    pytest.param(
        [25, 12],
        [25, 4],
        4,
        2,
        64,
        16,
        F16,
        {0: range(5, 19), 1: range(8, 12)},
        {"softcap": 3.0, "sliding_window": 7, "config": {"num_splits": 2, "block_n": 16}},
        id="softcap-window-splitK2-fp16",
    ),
    pytest.param(
        [12, 7], [12, 3], 2, 1, 64, 16, F32, {0: [11], 1: [0]}, {"causal": False}, id="noncausal"
    ),
    pytest.param(
        [20, 9],
        [7, 9],
        32,
        1,
        64,
        16,
        F16,
        {0: range(13, 17), 1: range(0, 9, 2)},
        {},
        id="prefix-MQA-group32",
    ),
    pytest.param(
        [3, 6], [6, 6], 4, 2, 64, 8, F32, {0: [2], 1: [0, 5]}, {}, id="qlen-gt-seqlen-and-holes"
    ),
]


@pytest.mark.parametrize("seq_lens, q_lens, hq, hkv, d, bs, dtype, holes, kwargs", CASES)
def test_slot_valid(make_paged, seq_lens, q_lens, hq, hkv, d, bs, dtype, holes, kwargs):
    problem = make_paged(seq_lens, q_lens, hq, hkv, d, bs, dtype)
    check(problem, problem.slot_valid(holes), **kwargs)


def test_rows_seeing_only_invalid_keys_are_exact_zeros(make_paged):
    """Decode row 1 (all of its keys invalid), prefill rows whose causal window holds only
    holes, and a split-K decode row: each outputs exactly 0."""
    problem = make_paged([10, 5], None, 4, 2, 64, 8, F32)
    out = check(problem, problem.slot_valid({1: range(5)}), config={"num_splits": 2, "block_n": 16})
    assert torch.equal(out[1], torch.zeros_like(out[1])) and (out[0].abs().sum(-1) > 0).all()

    problem = make_paged([24, 9], [24, 9], 4, 1, 64, 8, F32)
    out = check(problem, problem.slot_valid({0: [0, 1, 2]}))
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))  # positions 0-2 see keys 0..p only
    assert (out[3:].abs().sum(-1) > 0).all()


def test_uint8_and_strided_slot_valid(make_paged):
    """uint8 (any nonzero byte is valid) and a strided view give the bool mask's result."""
    problem = make_paged([37, 20], [5, 20], 4, 2, 64, 8, F16)
    valid = problem.slot_valid({0: [3, 30, 31], 1: range(8, 16)})
    expected = check(problem, valid)
    as_bytes = valid.to(torch.uint8) * torch.randint(1, 255, valid.shape, dtype=torch.uint8)
    assert torch.equal(check(problem, as_bytes), expected)
    wide = torch.zeros(valid.shape[0], 3 * valid.shape[1], dtype=torch.bool)
    wide[:, ::3] = valid
    assert torch.equal(check(problem, wide[:, ::3]), expected)
    transposed = valid.t().contiguous().t()  # column-major
    assert torch.equal(check(problem, transposed), expected)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_valid_equals_no_mask(make_paged, backend):
    problem = make_paged([37, 9], [6, 9], 4, 2, 64, 8, F32, poison=False)
    everything = torch.ones(problem.key_cache.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(
        run(problem, everything, backend=backend), run(problem, None, backend=backend)
    )


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
def test_random_holes(make_paged, seed):
    """Random batches (decode-like, prefill and prefix rows, left padding) with random holes
    and random options and configs."""
    gen = torch.Generator().manual_seed(200 + seed)

    def draw(*choices):
        return choices[int(torch.randint(len(choices), (1,), generator=gen))]

    hkv, group, bs = draw(1, 2), draw(1, 3, 4), draw(4, 8, 16)
    seq_lens = torch.randint(1, 50, (int(torch.randint(1, 4, (1,), generator=gen)),),
                             generator=gen).tolist()  # fmt: skip
    q_lens = [draw(1, s, max(1, s // 3), s + 2) for s in seq_lens]
    kwargs = {"config": {"block_n": draw(16, 32), "num_splits": draw(1, 2, 3)}}
    if draw(True, False):
        kwargs["sliding_window"] = draw(1, 5, 17)
    if draw(True, False):
        kwargs["softcap"] = draw(3.0, 30.0)
    problem = make_paged(seq_lens, q_lens, hkv * group, hkv, 64, bs, draw(F16, F32), seed=seed)
    holes = {
        i: torch.nonzero(torch.rand(s, generator=gen) < draw(0.1, 0.5, 0.9)).flatten().tolist()
        for i, s in enumerate(seq_lens)
    }
    check(problem, problem.slot_valid(holes), **kwargs)
