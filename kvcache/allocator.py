"""The block pool: which blocks are free, who holds how many references, which are cached.

Freed blocks that hold a registered prefix stay findable by their hash until the pool needs
them back; the least recently freed is reused first (LRU). Freed blocks without a hash are put
at the head of the free queue so they are reused before any cached prefix is evicted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .block import BlockHash, FreeBlockQueue, KVCacheBlock

__all__ = ["KVCacheAllocator", "MemoryGauge", "OutOfBlocksError"]


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than an operation needs. Nothing was allocated."""

    def __init__(self, needed: int, free: int, total: int, hint: str = "") -> None:
        self.needed, self.free, self.total = needed, free, total
        message = f"out of KV cache blocks: needed {needed}, free {free}, total {total}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


class MemoryGauge:
    """KV bytes held across several pools (one per KV cache group), and their peak."""

    def __init__(self, bytes_per_block: list[int]) -> None:
        self._bytes_per_block = bytes_per_block
        self._used = [0] * len(bytes_per_block)
        self.used_bytes = 0
        self.peak_bytes = 0

    def set_used(self, pool: int, blocks: int) -> None:
        used = self.used_bytes + (blocks - self._used[pool]) * self._bytes_per_block[pool]
        self._used[pool] = blocks
        self.used_bytes = used
        if used > self.peak_bytes:
            self.peak_bytes = used

    def reset_peak(self) -> None:
        self.peak_bytes = self.used_bytes

    def check_invariants(self, allocators: list[KVCacheAllocator]) -> None:
        assert self.used_bytes == sum(
            a.num_used_blocks * b for a, b in zip(allocators, self._bytes_per_block, strict=True)
        )


class KVCacheAllocator:
    """Owns every `KVCacheBlock`: allocation, ref counts, prefix-cache index, LRU eviction."""

    def __init__(
        self,
        num_blocks: int,
        enable_prefix_caching: bool = True,
        gauge: MemoryGauge | None = None,
        pool: int = 0,
    ) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} is invalid; expected an integer >= 1")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self.blocks)
        # Full blocks registered for prefix reuse, free or in use: key -> block.
        self._cached: dict[BlockHash, KVCacheBlock] = {}
        self.num_evictions = 0
        # Most blocks in use at once since creation or `reset_peak`.
        self.peak_used_blocks = 0
        self._gauge, self._pool = gauge, pool  # this pool's share of the bytes held

    @classmethod
    def pools(cls, config: Any) -> tuple[MemoryGauge, list[KVCacheAllocator]]:
        """One allocator per KV cache group of a `KVCacheConfig`, and the gauge that counts
        their bytes together."""
        groups = range(len(config.groups))
        gauge = MemoryGauge([config.group_bytes_per_block(g) for g in groups])
        prefix = config.enable_prefix_caching
        return gauge, [cls(config.group_blocks(g), prefix, gauge, pool=g) for g in groups]

    # ---- counts ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self._free.size

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._free.size

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or free but not yet evicted)."""
        return len(self._cached)

    # ---- allocate / free ------------------------------------------------------------------
    def allocate(self, n: int) -> list[KVCacheBlock]:
        """Take `n` free blocks (ref count 1 each), evicting cached ones in LRU order."""
        if n > self._free.size:
            raise OutOfBlocksError(n, self._free.size, self.num_blocks)
        out = []
        for _ in range(n):
            block = self._free.pop_front()
            if block.block_hash is not None:
                self.unregister(block)
                self.num_evictions += 1
            block.ref_count = 1
            out.append(block)
        self._count()
        return out

    def free(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue.

        Pass a sequence's blocks tail first: its last blocks are then evicted before its first,
        so a shared prefix survives longest.
        """
        for block in blocks:
            assert block.ref_count > 0, f"block {block.block_id}: ref count would go below zero"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free.push_front(block)
                else:
                    self._free.push_back(block)
        if self._gauge is not None:
            self._gauge.set_used(self._pool, self.num_used_blocks)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add a reference to each block (a prefix-cache hit or a fork), reviving free ones."""
        for block in blocks:
            if block.ref_count == 0:
                self._free.remove(block)
            block.ref_count += 1
        self._count()

    def _count(self) -> None:
        used = self.num_used_blocks
        self.peak_used_blocks = max(self.peak_used_blocks, used)
        if self._gauge is not None:
            self._gauge.set_used(self._pool, used)

    def reset_peak(self) -> None:
        """Start measuring the peak of blocks in use from now."""
        self.peak_used_blocks = self.num_used_blocks

    # ---- prefix cache ---------------------------------------------------------------------
    def lookup(self, key: BlockHash) -> KVCacheBlock | None:
        if not self.enable_prefix_caching:
            return None
        return self._cached.get(key)

    def register(self, block: KVCacheBlock, key: BlockHash) -> bool:
        """Make a full block findable by `key`. Returns False if another block already is."""
        if not self.enable_prefix_caching:
            return False
        assert block.ref_count > 0, f"registering free block {block.block_id}"
        if block.block_hash is not None:
            return block.block_hash == key
        if key in self._cached:
            return False
        block.block_hash = key
        self._cached[key] = block
        return True

    def unregister(self, block: KVCacheBlock) -> None:
        """Take a block out of the prefix cache (its content is about to change)."""
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> int:
        """Forget every registered hash (blocks in use keep their data). Returns how many."""
        n = len(self._cached)
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return n

    def check_invariants(self, owners: dict[int, int] | None = None) -> None:
        """Assert the pool is consistent; `owners` maps block_id -> number of holders."""
        free_ids = {b.block_id for b in self._free}
        assert len(free_ids) == self._free.size, "free queue size is off or holds a block twice"
        for block in self.blocks:
            is_free = block.block_id in free_ids
            assert is_free == (block.ref_count == 0), (
                f"block {block.block_id}: ref_count {block.ref_count}, in free queue {is_free}"
            )
            if owners is not None:
                assert owners.get(block.block_id, 0) == block.ref_count, (
                    f"block {block.block_id}: ref_count {block.ref_count} but "
                    f"{owners.get(block.block_id, 0)} holders"
                )
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, (
                    f"block {block.block_id} has a hash the cache index does not map to it"
                )
        assert len(self._cached) == sum(b.block_hash is not None for b in self.blocks)
