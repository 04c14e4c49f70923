"""What a block is: its bookkeeping record, its prefix-cache key, and the queue of free blocks."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["BlockHash", "FreeBlockQueue", "KVCacheBlock"]


class BlockHash(NamedTuple):
    """Prefix-cache key of a full block: chained through the parent block's hash.

    The dictionary lookup compares the token ids themselves, so two blocks collide only if the
    64-bit hashes of their whole prefixes do, not merely of their own tokens.
    """

    parent: int | None  # `value` of the previous block's key; None for a sequence's first block
    token_ids: tuple[int, ...]
    extra_key: Hashable = None  # a namespace (model id, adapter name): equal tokens, other K/V

    @property
    def value(self) -> int:
        return hash(self)

    @classmethod
    def chain(
        cls, parent: BlockHash | None, token_ids: Sequence[int], extra_key: Hashable = None
    ) -> BlockHash:
        """The key of the block holding `token_ids` right after the block keyed `parent`."""
        return cls(None if parent is None else parent.value, tuple(token_ids), extra_key)


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """Bookkeeping for one physical block of the pool (the K/V live in `PagedKVCache`).

    Blocks are created once by the allocator and reused forever; identity is `block_id`.
    """

    # Index of this block in the pool; also its entry in block tables.
    block_id: int
    # Number of holders (sequences whose block table has it, open steps keeping it for an
    # undo). 0 = free (possibly still cached).
    ref_count: int = 0
    # Key of the tokens this block holds, set once it is full and registered in the prefix
    # cache; None otherwise.
    block_hash: BlockHash | None = None
    # Links of the allocator's intrusive free queue; None when not in the queue.
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)

    @property
    def is_free(self) -> bool:
        return self.ref_count == 0


class FreeBlockQueue:
    """Doubly linked list of free blocks, threaded through the blocks themselves.

    Hand-made because the allocator must remove a block from the middle (a cache hit on a free
    block) in O(1) and without allocating: `collections.deque.remove` is O(n), and an
    OrderedDict allocates a node per insertion.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels: never handed out
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.size = 0
        for block in blocks:
            self.push_back(block)

    def _link(self, block: KVCacheBlock, prev: KVCacheBlock, nxt: KVCacheBlock) -> None:
        assert block.prev_free is None and block.next_free is None, (
            f"block {block.block_id} is already in the free queue"
        )
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = nxt.prev_free = block
        self.size += 1

    def push_back(self, block: KVCacheBlock) -> None:
        self._link(block, self._tail.prev_free, self._tail)

    def push_front(self, block: KVCacheBlock) -> None:
        self._link(block, self._head, self._head.next_free)

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not free"
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self.size -= 1

    def pop_front(self) -> KVCacheBlock:
        block = self._head.next_free
        assert block is not self._tail, "pop from an empty free queue"
        self.remove(block)
        return block

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self._head.next_free
        while block is not self._tail:
            yield block
            block = block.next_free
