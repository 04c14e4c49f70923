"""PagedCache on its own (no model): the Cache API transformers calls, on manager state."""

from __future__ import annotations

import pytest
import torch

from pagedkv.integrations import PagedCache
from pagedkv.kvcache import KVCacheConfig, KVCacheManager

LAYERS, HEADS, DIM, BS = 2, 2, 8, 4


@pytest.fixture
def manager():
    return KVCacheManager(
        KVCacheConfig(
            num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, block_size=BS, num_blocks=32
        )
    )


def _step(cache, batch, q_len, mask=None, seed=0, layers=LAYERS, **kwargs):
    """One forward: what the model's pre-hook and layers do. Returns the K written per layer."""
    gen = torch.Generator().manual_seed(seed)
    cache.begin_forward(mask, batch, q_len, **kwargs)
    keys = []
    for layer in range(layers):
        k = torch.randn(batch, HEADS, q_len, DIM, generator=gen)
        cache.update(k, k + 1, layer)
        keys.append(k)
    cache.end_forward()
    return keys


def _lens(cache):
    return [cache.manager.seq_len(s) for s in cache.seq_ids]


def test_left_pads_are_not_stored(manager):
    cache = PagedCache(manager)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    keys = _step(cache, 2, 5, mask)
    assert cache.get_seq_length() == 5 and _lens(cache) == [3, 5]
    assert manager.num_used_blocks == 1 + 2
    # row 0's stored keys are its last 3 columns
    key, _ = manager.cache.gather(
        0, manager.block_tables(cache.seq_ids), manager.seq_lens(cache.seq_ids)
    )
    torch.testing.assert_close(key[:3], keys[0][0, :, 2:].transpose(0, 1), rtol=0, atol=0)
    _step(cache, 2, 1)
    assert cache.get_seq_length() == 6 and _lens(cache) == [4, 6]
    assert cache.get_mask_sizes(1, 0) == (7, 0)


def test_repeat_select_crop_reorder(manager):
    cache = PagedCache(manager)
    _step(cache, 2, 6)
    used = manager.num_used_blocks
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4 and manager.num_used_blocks == used, "repeats share blocks"
    assert cache.num_blocks == used and cache.kv_bytes == used * manager.config.bytes_per_block
    cache.reorder_cache(torch.tensor([1, 1, 2, 3]))
    _step(cache, 4, 1)  # each row writes into its (shared) last block: copy on write
    assert manager.stats.cow_copies >= 1
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert cache.batch_size == 2 and _lens(cache) == [7, 7]
    cache.crop(-3)
    assert cache.get_seq_length() == 4 and _lens(cache) == [4, 4]
    cache.crop(2)  # legacy: absolute new length
    assert cache.get_seq_length() == 2 and _lens(cache) == [2, 2]
    manager.check_invariants()
    cache.free()
    assert manager.num_used_blocks == 0 and not list(manager)


def test_update_outside_a_forward_and_bad_shapes(manager):
    cache = PagedCache(manager)
    with pytest.raises(RuntimeError, match="outside a forward"):
        cache.update(torch.zeros(1, HEADS, 1, DIM), torch.zeros(1, HEADS, 1, DIM), 0)
    cache.begin_forward(None, 2, 3)
    with pytest.raises(ValueError, match="kv_heads"):
        cache.update(torch.zeros(2, HEADS + 1, 3, DIM), torch.zeros(2, HEADS + 1, 3, DIM), 0)
    cache.end_forward()
    with pytest.raises(ValueError, match="batch size 3"):
        cache.begin_forward(None, 3, 1)


def test_dropped_cache_frees_its_blocks(manager):
    cache = PagedCache(manager)
    _step(cache, 3, 5)
    assert manager.num_used_blocks == 3 * 2
    del cache
    assert manager.num_used_blocks == 0


def test_cache_flags():
    cfg = KVCacheConfig(num_layers=3, num_kv_heads=1, head_dim=4, block_size=2, num_blocks=4)
    cache = PagedCache(KVCacheManager(cfg))
    assert len(cache) == 3 and not cache.is_compileable and cache.is_croppable
    assert cache.get_seq_length() == 0 and cache.batch_size == -1
    with pytest.raises(TypeError, match="KVCacheManager"):
        PagedCache(cfg)


def test_refed_tokens_are_caught(manager):
    """Columns the cache holds fed again: wrong mask width or positions raise, not corrupt."""
    cache = PagedCache(manager)
    _step(cache, 1, 6)
    with pytest.raises(RuntimeError, match="width 6"):
        cache.begin_forward(torch.ones(1, 6, dtype=torch.long), 1, 6)
    with pytest.raises(RuntimeError, match="position 0, but the cache holds 6"):
        cache.begin_forward(None, 1, 3, position_ids=torch.arange(3)[None])
    _step(cache, 1, 3, position_ids=torch.arange(6, 9)[None])  # follows: fine
    assert _lens(cache) == [9]


def test_a_failed_forward_leaves_the_rows_as_before(manager):
    """A forward that stops midway (an error, or Ctrl-C that skips the forward hook) aborts its
    step: the rows, their lengths and the columns transformers sees are as before it, its
    forks are gone, and the same forward can run again."""
    cache = PagedCache(manager)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    _step(cache, 1, 6, input_ids=ids)
    before = (cache.seq_ids, _lens(cache), cache.get_seq_length(), manager.num_used_blocks)
    # Beam expansion to 3 rows; one layer of two stores its K/V, then the forward dies.
    _step(cache, 3, 1, layers=1, input_ids=torch.tensor([[11]] * 3))
    assert (cache.seq_ids, _lens(cache), cache.get_seq_length(), manager.num_used_blocks) == before
    # Interrupted: the hook never runs; the next forward aborts the open one first.
    cache.begin_forward(None, 3, 1)
    cache.update(*[torch.zeros(3, HEADS, 1, DIM)] * 2, 0)
    _step(cache, 3, 1, input_ids=torch.tensor([[11]] * 3))
    assert cache.batch_size == 3 and _lens(cache) == [7, 7, 7]
    assert manager.token_ids(cache.seq_ids[1]) == [5, 6, 7, 8, 9, 10, 11]
    manager.check_invariants()
    cache.begin_forward(None, 3, 1)  # left open, then the cache is freed: aborted, released
    cache.free()
    assert manager.num_used_blocks == 0 and manager.stats.num_cached_blocks == 1
    manager.check_invariants()
