"""The torch reference (the CPU backend) against the naive float64 per-sequence oracle
(`pagedkv.kernels.testing.oracle_attention`)."""

from __future__ import annotations

import pytest
import torch

from pagedkv.kernels import reference
from pagedkv.kernels.testing import oracle_attention


def run_reference(problem, **kwargs):
    return reference.paged_attention(
        problem.query,
        problem.key_cache,
        problem.value_cache,
        problem.block_tables,
        problem.seq_lens,
        query_start_loc=problem.query_start_loc,
        **kwargs,
    )


TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

CASES = [
    # seq_lens, q_lens (None = decode), Hq, Hkv, D, bs, dtype, kwargs
    pytest.param([20], [20], 4, 2, 64, 8, torch.float32, {}, id="plain-prefill-B1-sdpa-is-causal"),
    pytest.param(
        [12, 12], [12, 12], 4, 1, 64, 8, torch.float32, {}, id="plain-prefill-B2-sdpa-is-causal"
    ),
    pytest.param(
        [12, 12],
        [12, 12],
        4,
        1,
        64,
        8,
        torch.float32,
        {"sliding_window": 3},
        id="plain-prefill-B2-window",
    ),
    pytest.param(
        [1, 16, 37], None, 8, 2, 64, 16, torch.float32, {}, id="decode-B3-Hq8-Hkv2-D64-bs16"
    ),
    pytest.param([5], None, 4, 4, 80, 8, torch.float32, {}, id="decode-B1-Hq4-Hkv4-D80-bs8"),
    pytest.param([9, 33], None, 8, 1, 96, 32, torch.float16, {}, id="decode-B2-MQA-D96-bs32-fp16"),
    pytest.param([20, 7], None, 4, 2, 64, 8, torch.bfloat16, {}, id="decode-B2-bf16"),
    pytest.param(
        [17, 1, 32],
        [17, 1, 32],
        8,
        2,
        64,
        16,
        torch.float32,
        {},
        id="prefill-B3-T50-Hq8-Hkv2-D64-bs16",
    ),
    pytest.param(
        [20, 33, 16],
        [4, 1, 16],
        8,
        2,
        128,
        32,
        torch.float32,
        {},
        id="prefix-B3-T21-Hq8-Hkv2-D128-bs32",
    ),
    pytest.param([12], [12], 2, 1, 64, 16, torch.float32, {"causal": False}, id="noncausal-B1"),
    pytest.param(
        [30, 9], [5, 9], 4, 2, 64, 8, torch.float32, {"sliding_window": 4}, id="window4-B2-prefix"
    ),
    pytest.param(
        [30, 9], None, 4, 2, 64, 8, torch.float32, {"sliding_window": 1}, id="window1-decode"
    ),
    pytest.param(
        [25, 3], [6, 3], 4, 1, 64, 16, torch.float32, {"softcap": 5.0}, id="softcap5-B2-prefix"
    ),
    pytest.param(
        [25, 3],
        None,
        4,
        4,
        64,
        16,
        torch.float16,
        {"softcap": 2.0, "sliding_window": 8},
        id="softcap-window-decode-fp16",
    ),
    pytest.param([3, 5], [6, 7], 4, 2, 64, 8, torch.float32, {}, id="qlen-gt-seqlen-zero-rows"),
    # Many decodes of very different lengths (run in batches of similar lengths).
    pytest.param(
        [70, 3, 41, 9, 66, 1, 30, 17, 55, 12, 4, 48, 25, 62, 8, 36, 20],
        None,
        4,
        2,
        64,
        8,
        torch.float32,
        {},
        id="decode-B17-length-buckets",
    ),
    pytest.param(
        [70, 3, 41, 9, 66, 1, 30, 17, 55, 12, 4, 48, 25, 62, 8, 36, 20],
        None,
        4,
        2,
        64,
        8,
        torch.float32,
        {"sliding_window": 6, "softcap": 3.0},
        id="decode-B17-length-buckets-window-softcap",
    ),
    # A continuous-batching step: decodes beside prompt chunks (the one-query rows run apart).
    pytest.param(
        [40, 9, 23, 5], [1, 9, 1, 1], 4, 2, 64, 8, torch.float32, {}, id="mixed-decodes-chunk"
    ),
    pytest.param(
        [40, 30, 23, 12],
        [1, 14, 1, 1],
        4,
        2,
        64,
        8,
        torch.float32,
        {"sliding_window": 5},
        id="mixed-window5",
    ),
    pytest.param(
        [40, 30, 7], [1, 14, 1], 4, 1, 64, 16, torch.float16, {"softcap": 4.0}, id="mixed-softcap"
    ),
    pytest.param(
        [3, 5], [6, 7], 4, 2, 64, 8, torch.float32, {"softcap": 3.0}, id="qlen-gt-seqlen-softcap"
    ),
]


# How the reference splits a call: as measured (small cases run as one padded call), or
# forced to split wherever that pads less (a call per prefill row, decodes in several batches).
SPLITS = [
    pytest.param(False, id="as-measured"),
    pytest.param(True, id="forced-split"),
]


@pytest.fixture(params=SPLITS)
def split(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(reference, "_CALL_COST", 0)
        monkeypatch.setattr(reference, "_BATCH_COST_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("seq_lens, q_lens, hq, hkv, d, bs, dtype, kwargs", CASES)
def test_reference_matches_oracle(
    make_paged, split, seq_lens, q_lens, hq, hkv, d, bs, dtype, kwargs
):
    problem = make_paged(seq_lens, q_lens, hq, hkv, d, bs, dtype)
    scale = d**-0.5
    out = run_reference(problem, scale=scale, **kwargs)
    expected = oracle_attention(problem, scale=scale, **kwargs)
    assert out.dtype == dtype and not out.isnan().any()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


SLOT_VALID_CASES = [
    # seq_lens, q_lens (None = decode), Hq, Hkv, D, bs, dtype, holes {seq: positions}, kwargs
    pytest.param([20, 7], None, 4, 2, 64, 8, torch.float32, {0: [3, 4, 15]}, {}, id="decode"),
    pytest.param(
        [20, 7], None, 4, 2, 64, 8, torch.float32, {1: range(7)}, {}, id="decode-row-all-invalid"
    ),
    pytest.param(
        [12, 12], [12, 12], 4, 1, 64, 8, torch.float32, {0: [0], 1: range(6, 10)}, {},
        id="prefill-causal-across-blocks",
    ),
    pytest.param(
        [30, 9], [5, 9], 4, 2, 64, 8, torch.float32, {0: range(20, 28), 1: [0, 8]},
        {"sliding_window": 4}, id="prefix-window4-rows-all-invalid",
    ),
    pytest.param(
        [25, 3], [6, 3], 4, 1, 64, 16, torch.float32, {0: [1, 24], 1: [2]}, {"softcap": 5.0},
        id="prefix-softcap",
    ),
    pytest.param(
        [12, 5], [12, 2], 2, 1, 64, 16, torch.float32, {0: [11], 1: [0, 1]}, {"causal": False},
        id="noncausal",
    ),
    pytest.param(
        [9, 33], None, 8, 1, 96, 32, torch.float16, {1: range(0, 33, 3)}, {}, id="decode-MQA-fp16"
    ),
    pytest.param(
        [3, 5], [6, 7], 4, 2, 64, 8, torch.float32, {0: [1], 1: [4]}, {"softcap": 3.0},
        id="qlen-gt-seqlen-softcap",
    ),
    pytest.param(
        [40, 12, 23], [1, 12, 1], 4, 2, 64, 8, torch.float32, {0: [3, 39], 1: [5], 2: [0]}, {},
        id="mixed-decodes-chunk",
    ),
]  # fmt: skip


@pytest.mark.parametrize("seq_lens, q_lens, hq, hkv, d, bs, dtype, holes, kwargs", SLOT_VALID_CASES)
def test_reference_slot_valid_matches_oracle(
    make_paged, split, seq_lens, q_lens, hq, hkv, d, bs, dtype, holes, kwargs
):
    """slot_valid: holes are NaN-poisoned in the cache; the oracle masks them explicitly."""
    problem = make_paged(seq_lens, q_lens, hq, hkv, d, bs, dtype)
    slot_valid = problem.slot_valid(holes)
    scale = d**-0.5
    out = run_reference(problem, scale=scale, slot_valid=slot_valid, **kwargs)
    expected = oracle_attention(problem, scale=scale, slot_valid=slot_valid, **kwargs)
    assert out.dtype == dtype and not out.isnan().any()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_reference_ignores_unread_table_entries(make_paged, split):
    """Entries past a shorter row's blocks are never read: any value may sit there."""
    problem = make_paged([37, 5], [6, 5], 4, 2, 64, 8, torch.float32)
    expected = oracle_attention(problem, scale=0.125)
    problem.block_tables[1, 1:] = -1
    problem.block_tables[0, -1] = 1 << 30
    out = run_reference(problem, scale=0.125)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_zero_rows_are_exact_zeros(make_paged, split):
    problem = make_paged([2, 4], [5, 4], 4, 2, 64, 8, torch.float32)
    out = run_reference(problem, scale=0.125)
    # sequence 0: 5 queries over 2 keys -> its first 3 queries sit at negative positions
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert (out[3:5].abs().sum(-1) > 0).all()


def test_reference_out_argument(make_paged, split):
    problem = make_paged([7, 3], None, 4, 2, 64, 8, torch.float32)
    out = torch.full_like(problem.query, float("nan"))
    result = run_reference(problem, scale=0.125, out=out)
    assert result is out
    expected = oracle_attention(problem, scale=0.125)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_gather_is_inverse_of_write(make_paged):
    problem = make_paged([1, 16, 21], None, 4, 2, 64, 8, torch.bfloat16)
    key, value = reference.gather_kv(
        problem.key_cache, problem.value_cache, problem.block_tables, problem.seq_lens
    )
    assert torch.equal(key, problem.key) and torch.equal(value, problem.value)


def test_reference_write_skips_padding_slots():
    cache = torch.full((4, 8, 2, 64), float("nan"))
    values = torch.randn(3, 2, 64)
    reference.write_kv(values, values, cache, cache.clone(), torch.tensor([9, -1, 31]))
    assert torch.equal(cache[1, 1], values[0]) and torch.equal(cache[3, 7], values[2])
    assert cache.isnan().sum() == (4 * 8 - 2) * 2 * 64


def test_reference_copy_blocks_every_layer():
    layers = [torch.randn(6, 8, 2, 64) for _ in range(3)]
    before = [c.clone() for c in layers]
    reference.copy_blocks(layers, layers, torch.tensor([[1, 4], [2, 5]]))
    for cache, old in zip(layers, before, strict=True):
        assert torch.equal(cache[4], old[1]) and torch.equal(cache[5], old[2])
        assert torch.equal(cache[:4], old[:4])


def test_softcap_attention_chunks_rows():
    """Long prompts go through the softcap path in row chunks; chunking changes nothing."""
    from pagedkv.kernels.reference import _eager_attention

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 37, 64, generator=gen)
    k, v = torch.randn(2, 2, 50, 64, generator=gen), torch.randn(2, 2, 50, 64, generator=gen)
    for mask in (torch.rand(2, 37, 50, generator=gen) > 0.3, torch.rand(2, 1, 50) > 0.3, None):
        whole = _eager_attention(q, k, v, mask, scale=0.1, softcap=5.0)
        chunked = _eager_attention(q, k, v, mask, scale=0.1, softcap=5.0, max_scores=4000)
        torch.testing.assert_close(chunked, whole, equal_nan=True)


@pytest.mark.parametrize("q_lens", [None, [6, 6, 6, 6]], ids=["decode", "prefill"])
def test_reference_out_argument_split(make_paged, monkeypatch, q_lens):
    """A split call writes every row of `out` (rows of several lengths, out NaN before)."""
    monkeypatch.setattr(reference, "_CALL_COST", 0)
    monkeypatch.setattr(reference, "_BATCH_COST_ELEMENTS", 0)
    problem = make_paged([40, 3, 6, 25], q_lens, 4, 2, 64, 8, torch.float32)
    out = torch.full_like(problem.query, float("nan"))
    assert run_reference(problem, scale=0.125, out=out) is out
    expected = oracle_attention(problem, scale=0.125)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_decode_batches():
    """Decodes of very different lengths run in batches of similar lengths when the padding
    saved outweighs a batch's cost; similar lengths run as one batch."""
    order, bounds = reference._decode_batches((30, 2000, 40, 1990, 35), row_elements=256)
    assert [[order[i] for i in range(a, b)] for a, b in bounds] == [[1, 3], [2, 4, 0]]
    one = (None, ((0, 4),))
    assert reference._decode_batches((500, 510, 490, 505), row_elements=256) == one
    assert reference._decode_batches((2000,), row_elements=256) == (None, ((0, 1),))


def _expanded(problem, copies: int):
    """`problem`'s one prompt as `copies` rows with the same blocks and queries (beams that a
    prompt's forward expanded)."""
    (q_len,) = problem.q_lens
    tables = problem.block_tables.expand(copies, -1).contiguous()
    seq_lens = problem.seq_lens.expand(copies).contiguous()
    query = problem.query.repeat(copies, 1, 1)
    loc = torch.arange(copies + 1, dtype=torch.int32) * q_len
    return query, tables, seq_lens, loc


def test_reference_same_rows_computed_once(make_paged, monkeypatch):
    """Rows with the same lengths, blocks and queries get the same output, computed once."""
    problem = make_paged([300], [300], 4, 2, 64, 16, torch.float32)
    query, tables, seq_lens, loc = _expanded(problem, 4)
    calls = []
    attend = reference._attend_padded
    monkeypatch.setattr(
        reference, "_attend_padded", lambda *a, **k: calls.append(1) or attend(*a, **k)
    )
    out = reference.paged_attention(
        query, problem.key_cache, problem.value_cache, tables, seq_lens,
        query_start_loc=loc, scale=0.125,
    )  # fmt: skip
    assert len(calls) == 1
    one = oracle_attention(problem, scale=0.125)
    torch.testing.assert_close(out.double(), one.repeat(4, 1, 1), atol=1e-5, rtol=1e-5)


def test_reference_rows_with_other_queries_are_computed(make_paged, monkeypatch):
    """Same lengths and blocks but another query: that row is computed, not copied."""
    monkeypatch.setattr(reference, "_CALL_COST", 0)
    problem = make_paged([40], [40], 4, 2, 64, 8, torch.float32)
    query, tables, seq_lens, loc = _expanded(problem, 3)
    query[40 + 7] += 1.0  # row 1, one query
    out = reference.paged_attention(
        query, problem.key_cache, problem.value_cache, tables, seq_lens,
        query_start_loc=loc, scale=0.125,
    )  # fmt: skip
    one = oracle_attention(problem, scale=0.125)
    torch.testing.assert_close(out[:40].double(), one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[80:].double(), one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[47], out[7])
    problem.query = query[40:80]
    torch.testing.assert_close(
        out[40:80].double(), oracle_attention(problem, scale=0.125), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "seq_lens, kwargs, holes",
    [
        pytest.param([1, 16, 37], {}, None, id="ragged"),
        pytest.param([70, 3, 41, 9, 66, 1, 30, 17, 55, 12], {}, None, id="batches"),
        pytest.param([30, 9, 44], {"sliding_window": 6}, None, id="window"),
        pytest.param([20, 7, 33], {}, {0: [3, 4, 15], 1: range(7)}, id="holes"),
        pytest.param([25, 3], {"softcap": 2.0}, None, id="softcap"),
    ],
)
def test_reference_decode_plan_serves_every_layer(make_paged, split, seq_lens, kwargs, holes):
    """A decode planned once (`plan_decode`) then attended per layer (`attend_decode`) equals
    `paged_attention` on each layer, and counts as a paged_attention call in a trace."""
    from pagedkv.kernels import trace_backends

    problem = make_paged(seq_lens, None, 4, 2, 64, 8, torch.float32, num_layers=2)
    slot_valid = None if holes is None else problem.slot_valid(holes)
    window = {"sliding_window": kwargs["sliding_window"]} if "sliding_window" in kwargs else {}
    plan = reference.plan_decode(
        problem.block_tables, problem.seq_lens, problem.key_cache, slot_valid=slot_valid, **window
    )
    softcap = kwargs.get("softcap")
    pool = problem.pool
    pool[:, 1] = pool[:, 0] * -0.5  # layer 1: other K/V in the same slots (NaN where unwritten)
    for layer in range(2):
        key_cache, value_cache = pool[:, layer, 0], pool[:, layer, 1]
        with trace_backends() as calls:
            out = reference.attend_decode(
                plan, problem.query, key_cache, value_cache, scale=0.125, softcap=softcap
            )
        assert calls == [("paged_attention", "torch")]
        expected = reference.paged_attention(
            problem.query, key_cache, value_cache, problem.block_tables, problem.seq_lens,
            scale=0.125, slot_valid=slot_valid, **kwargs,
        )  # fmt: skip
        assert torch.equal(out, expected)
    assert not out.isnan().any()


@pytest.mark.parametrize(
    "seq_lens, shared_blocks",
    [
        pytest.param([300, 300, 300, 300], 18, id="beams-equal"),
        pytest.param([300, 317, 290, 333], 18, id="beams-ragged"),
        pytest.param([300, 317, 290, 333], 12, id="part-of-the-prefix"),
    ],
)
def test_reference_decode_shared_prefix(make_paged, seq_lens, shared_blocks):
    """Rows whose tables start with the same blocks (beams of one prompt): those blocks are
    attended once for every row's query, then merged with each row's own keys; the result is
    the attention over each row's whole table."""
    problem = make_paged(seq_lens, None, 8, 4, 64, 16, torch.float32)
    tables = problem.block_tables
    tables[1:, :shared_blocks] = tables[0, :shared_blocks]  # rows 1.. read row 0's first blocks
    args = (problem.block_tables, problem.seq_lens, problem.key_cache)
    plan = reference.plan_decode(*args)
    assert plan.shared is not None and plan.shared.tolist() == tables[0, :shared_blocks].tolist()
    out = reference.attend_decode(
        plan, problem.query, problem.key_cache, problem.value_cache, scale=0.125
    )
    double = [t.double() for t in (problem.query, problem.key_cache, problem.value_cache)]
    alone = reference.plan_decode(*args, share=False)
    assert alone.shared is None
    expected = reference.attend_decode(alone, *double, scale=0.125)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_decode_shares_only_what_pays(make_paged, monkeypatch):
    """No shared prefix for rows of distinct blocks, a few shared keys, or one row."""
    problem = make_paged([300, 317, 290], None, 8, 4, 64, 16, torch.float32)
    args = (problem.block_tables, problem.seq_lens, problem.key_cache)
    assert reference.plan_decode(*args).shared is None
    problem.block_tables[1:, :1] = problem.block_tables[0, :1]  # 16 keys: not worth a call
    assert reference.plan_decode(*args).shared is None
    monkeypatch.setattr(reference, "_SHARE_MIN_ELEMENTS", 0)  # even when anything would pay
    problem.block_tables[1:, :1] = problem.block_tables[0, :1] + 1  # nothing shared
    assert reference.plan_decode(*args).shared is None
    one = make_paged([300], None, 8, 4, 64, 16, torch.float32)
    assert reference.plan_decode(one.block_tables, one.seq_lens, one.key_cache).shared is None
