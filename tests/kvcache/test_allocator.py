import pytest

from pagedkv.kvcache import BlockHash, KVCacheAllocator, OutOfBlocksError


def test_allocate_and_free_keep_counts():
    a = KVCacheAllocator(8)
    blocks = a.allocate(3)
    assert [b.ref_count for b in blocks] == [1, 1, 1]
    assert a.num_free_blocks == 5 and a.num_used_blocks == 3
    a.free(blocks[::-1])
    assert a.num_free_blocks == 8
    a.check_invariants()


def test_out_of_blocks_is_typed_and_changes_nothing():
    a = KVCacheAllocator(4)
    a.allocate(3)
    with pytest.raises(OutOfBlocksError, match="needed 2, free 1, total 4") as info:
        a.allocate(2)
    assert (info.value.needed, info.value.free, info.value.total) == (2, 1, 4)
    assert a.num_free_blocks == 1
    a.check_invariants()


def test_double_free_is_caught():
    a = KVCacheAllocator(2)
    (b,) = a.allocate(1)
    a.free([b])
    with pytest.raises(AssertionError, match="below zero"):
        a.free([b])


def test_touch_revives_a_free_cached_block_from_the_middle_of_the_queue():
    a = KVCacheAllocator(4)
    blocks = a.allocate(4)
    key = BlockHash.chain(None, [1, 2])
    assert a.register(blocks[1], key)
    a.free(blocks)
    assert a.num_free_blocks == 4
    hit = a.lookup(key)
    assert hit is blocks[1]
    a.touch([hit])
    assert hit.ref_count == 1 and a.num_free_blocks == 3
    a.check_invariants()


def test_unhashed_blocks_are_reused_before_cached_ones_and_cached_in_lru_order():
    a = KVCacheAllocator(4)
    b0, b1, b2, b3 = a.allocate(4)
    k0, k1 = BlockHash.chain(None, [0]), BlockHash.chain(None, [1])
    a.register(b0, k0)
    a.register(b1, k1)
    a.free([b0])  # cached, freed first: least recently used
    a.free([b2])  # plain
    a.free([b1])  # cached, freed later
    a.free([b3])  # plain
    order = [a.allocate(1)[0] for _ in range(4)]
    assert order[:2] == [b3, b2]  # plain blocks first, most recently freed at the head
    assert order[2:] == [b0, b1]  # then cached, least recently freed first
    assert a.num_evictions == 2
    assert a.lookup(k0) is None and a.lookup(k1) is None
    a.check_invariants()


def test_one_block_per_key():
    a = KVCacheAllocator(4)
    b0, b1 = a.allocate(2)
    key = BlockHash.chain(None, [7, 8])
    assert a.register(b0, key)
    assert not a.register(b1, key)
    assert a.lookup(key) is b0 and b1.block_hash is None


def test_chained_keys_distinguish_the_same_tokens_after_different_prefixes():
    p1, p2 = BlockHash.chain(None, [1, 2]), BlockHash.chain(None, [3, 4])
    assert BlockHash.chain(p1, [5, 6]) != BlockHash.chain(p2, [5, 6])
    assert BlockHash.chain(p1, [5, 6]) == BlockHash.chain(p1, [5, 6])
    assert BlockHash.chain(None, [5, 6], "model-a") != BlockHash.chain(None, [5, 6], "model-b")


def test_prefix_caching_disabled_never_registers():
    a = KVCacheAllocator(2, enable_prefix_caching=False)
    (b,) = a.allocate(1)
    key = BlockHash.chain(None, [1])
    assert not a.register(b, key)
    assert a.lookup(key) is None


def test_reset_prefix_cache_forgets_every_key():
    a = KVCacheAllocator(3)
    blocks = a.allocate(3)
    for i, b in enumerate(blocks):
        a.register(b, BlockHash.chain(None, [i]))
    a.free(blocks[:1])
    assert a.reset_prefix_cache() == 3
    assert a.num_cached_blocks == 0 and all(b.block_hash is None for b in blocks)
    a.check_invariants()


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_pool_size(n):
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheAllocator(n)
