"""pagedkv.kernels.testing: the paged problems every kernel test (and the kernel benchmark and
autotune examples) run on are what they claim to be."""

from __future__ import annotations

import pytest
import torch

from pagedkv.kernels import gather_kv

F16, F32 = torch.float16, torch.float32


@pytest.mark.parametrize(
    "seq_lens, q_lens, bs, num_layers, spare",
    [
        pytest.param([1, 16, 37], None, 16, 1, 3, id="decode-B3-bs16"),
        pytest.param([9, 24], [4, 24], 8, 3, 0, id="prefill-B2-bs8-3layers-no-spare"),
        pytest.param([0, 5, 0], None, 4, 2, 1, id="empty-sequences"),
    ],
)
def test_problem_layout(make_paged, seq_lens, q_lens, bs, num_layers, spare):
    p = make_paged(seq_lens, q_lens, 4, 2, 64, bs, F32, spare_blocks=spare, num_layers=num_layers)
    needed = sum(-(-s // bs) for s in seq_lens)
    assert p.pool.shape == (1 + needed + spare, num_layers, 2, bs, 2, 64)
    # the caches are layer 0 of the pool, strided views as in kvcache
    assert p.key_cache.data_ptr() == p.pool[:, 0, 0].data_ptr()
    assert p.key_cache.stride() == p.pool[:, 0, 0].stride()
    assert p.value_cache.data_ptr() == p.pool[:, 0, 1].data_ptr()
    # each sequence owns distinct blocks; block 0 only pads, and every row has a padding column
    rows = [p.block_tables[i, : -(-s // bs)].tolist() for i, s in enumerate(seq_lens)]
    owned = [b for row in rows for b in row]
    assert len(set(owned)) == len(owned) and 0 not in owned
    assert p.block_tables.shape[1] == max(-(-s // bs) for s in seq_lens) + 1
    assert (p.block_tables[:, -1] == 0).all()
    # the keys sit at their slots, everything else is NaN (other layers included)
    assert p.written.sum() == sum(seq_lens)
    assert not p.key_cache[p.written].isnan().any()
    assert p.key_cache[~p.written].isnan().all() and p.value_cache[~p.written].isnan().all()
    assert p.pool[:, 1:].isnan().all()
    key, value = gather_kv(p.key_cache, p.value_cache, p.block_tables, p.seq_lens, backend="torch")
    assert torch.equal(key, p.key) and torch.equal(value, p.value)
    # queries: one per sequence for decode, else q_lens packed
    num_tokens = len(seq_lens) if q_lens is None else sum(q_lens)
    assert p.query.shape == (num_tokens, 4, 64)
    if q_lens is None:
        assert p.query_start_loc is None
    else:
        assert p.query_start_loc.tolist() == [0, *torch.tensor(q_lens).cumsum(0).tolist()]


def test_seed_poison_and_dtype(make_paged):
    a = make_paged([20, 3], [2, 3], 4, 2, 64, 8, F16, seed=5)
    b = make_paged([20, 3], [2, 3], 4, 2, 64, 8, F16, seed=5)
    c = make_paged([20, 3], [2, 3], 4, 2, 64, 8, F16, seed=6, poison=False)
    assert torch.equal(a.query, b.query) and torch.equal(a.block_tables, b.block_tables)
    assert torch.equal(a.pool.nan_to_num(), b.pool.nan_to_num())
    assert not torch.equal(a.query, c.query)
    assert not c.pool.isnan().any() and (c.key_cache[~c.written] == 0).all()
    assert a.pool.dtype == a.query.dtype == a.key.dtype == F16
    assert a.seq_lens.dtype == a.block_tables.dtype == a.query_start_loc.dtype == torch.int32
    assert a.slot_mapping.dtype == torch.int64


@pytest.mark.parametrize(
    "q_lens, released",
    [
        # seq_lens [53, 38, 6], bs 4, window 11: lowest key any query sees = seq_len - q_len - 10
        pytest.param(None, [10, 6, 0], id="decode"),  # keys 42, 27, 0
        pytest.param([7, 3, 6], [9, 6, 0], id="prefix"),  # keys 36, 25, and -10 -> 0
    ],
)
def test_release_out_of_window(make_paged, q_lens, released):
    p = make_paged([53, 38, 6], q_lens, 4, 2, 64, 4, F32)
    assert p.q_lens == (q_lens or [1, 1, 1])
    before = p.block_tables.clone()
    assert p.release_out_of_window(11) == sum(released)
    for seq, n in enumerate(released):
        assert (p.block_tables[seq, :n] == -1).all()
        assert torch.equal(p.block_tables[seq, n:], before[seq, n:])
        gone = before[seq, :n].long()
        assert p.key_cache[gone].isnan().all() and p.value_cache[gone].isnan().all()
        kept = before[seq, n : -(-[53, 38, 6][seq] // 4)].long()
        assert not p.key_cache[kept][p.written[kept]].isnan().any()
