"""What a block is, and the ordered list of blocks one sequence owns."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BlockTable", "KVCacheBlock", "KVCacheBlocks"]


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """Bookkeeping for one physical block of the pool (the K/V live in `PagedKVCache`).

    Blocks are created once by the allocator and reused forever; identity is `block_id`.
    """

    # Index of this block in the pool; also its entry in block tables.
    block_id: int
    # Number of sequences whose block table holds this block. 0 = free (possibly still cached).
    ref_count: int = 0
    # Chained hash of the tokens this block holds (parent hash, token ids, extra key), set once
    # the block is full and registered in the prefix cache; None otherwise.
    block_hash: int | None = None
    # Links of the allocator's intrusive free queue; None when not in the queue.
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)

    @property
    def is_free(self) -> bool:
        return self.ref_count == 0

    def incr_ref(self) -> None:
        self.ref_count += 1

    def decr_ref(self) -> None:
        assert self.ref_count > 0, f"block {self.block_id}: ref count would go below zero"
        self.ref_count -= 1

    def reset_hash(self) -> None:
        self.block_hash = None


class BlockTable:
    """Block-table rows of all live sequences, as numpy arrays the hot path can index at once.

    Row r holds a sequence's block ids (`ids[r, :num_blocks[r]]`) and its token count. The
    arrays grow by doubling; rows of freed sequences are reused.
    """

    def __init__(self, rows: int = 64, cols: int = 16) -> None:
        self.ids = np.zeros((rows, cols), dtype=np.int32)
        self.num_blocks = np.zeros(rows, dtype=np.int64)
        self.num_tokens = np.zeros(rows, dtype=np.int64)
        self._free_rows = list(range(rows - 1, -1, -1))

    def alloc_row(self) -> int:
        if not self._free_rows:
            old = self.ids.shape[0]
            self._resize(rows=2 * old)
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self._free_rows.pop()
        self.num_blocks[row] = 0
        self.num_tokens[row] = 0
        return row

    def release_row(self, row: int) -> None:
        self.ids[row] = 0  # padding value of block tables: a valid id, never read
        self.num_blocks[row] = 0
        self.num_tokens[row] = 0
        self._free_rows.append(row)

    def ensure_cols(self, cols: int) -> None:
        if cols > self.ids.shape[1]:
            self._resize(cols=max(cols, 2 * self.ids.shape[1]))

    def _resize(self, rows: int | None = None, cols: int | None = None) -> None:
        rows = rows or self.ids.shape[0]
        cols = cols or self.ids.shape[1]
        ids = np.zeros((rows, cols), dtype=np.int32)
        ids[: self.ids.shape[0], : self.ids.shape[1]] = self.ids
        self.ids = ids
        for name in ("num_blocks", "num_tokens"):
            old = getattr(self, name)
            new = np.zeros(rows, dtype=np.int64)
            new[: old.shape[0]] = old
            setattr(self, name, new)


class KVCacheBlocks:
    """The ordered blocks of one sequence: its row of the block table.

    A view onto one `BlockTable` row (ids and token count live there, so the batched hot path
    and this object never disagree) plus what prefix caching needs: the token ids when known and
    how many leading full blocks are registered already.
    """

    __slots__ = ("_table", "_pool", "row", "num_hashed", "last_key", "token_ids", "extra_key")

    def __init__(self, table: BlockTable, pool: Sequence[KVCacheBlock]) -> None:
        self._table = table
        # All blocks of the allocator, indexed by block id.
        self._pool = pool
        self.row = table.alloc_row()
        # Leading blocks already registered in the prefix cache.
        self.num_hashed = 0
        # Prefix-cache key of block `num_hashed - 1` (the parent of the next block to hash).
        self.last_key = None
        # Token ids of the sequence when known (needed to hash blocks as they fill); else None.
        self.token_ids: list[int] | None = None
        # Extra hash key (e.g. a model id or adapter name) of this sequence's blocks.
        self.extra_key: Hashable = None

    def release(self) -> None:
        self._table.release_row(self.row)
        self.row = -1

    @property
    def num_tokens(self) -> int:
        return int(self._table.num_tokens[self.row])

    @num_tokens.setter
    def num_tokens(self, value: int) -> None:
        self._table.num_tokens[self.row] = value

    def __len__(self) -> int:
        return int(self._table.num_blocks[self.row])

    @property
    def block_ids(self) -> list[int]:
        return self._table.ids[self.row, : len(self)].tolist()

    @property
    def blocks(self) -> list[KVCacheBlock]:
        return [self._pool[i] for i in self.block_ids]

    def __iter__(self) -> Iterator[KVCacheBlock]:
        return iter(self.blocks)

    def __getitem__(self, index: int) -> KVCacheBlock:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"block index {index} out of range for {n} blocks")
        return self._pool[int(self._table.ids[self.row, index])]

    def extend(self, blocks: Sequence[KVCacheBlock]) -> None:
        n = len(self)
        self._table.ensure_cols(n + len(blocks))
        self._table.ids[self.row, n : n + len(blocks)] = [b.block_id for b in blocks]
        self._table.num_blocks[self.row] = n + len(blocks)

    def set(self, index: int, block: KVCacheBlock) -> None:
        self._table.ids[self.row, index] = block.block_id

    def truncate(self, num_blocks: int) -> list[KVCacheBlock]:
        """Drop the blocks past the first `num_blocks`; returns them, tail first."""
        dropped = self.blocks[num_blocks:][::-1]
        self._table.ids[self.row, num_blocks : len(self)] = 0
        self._table.num_blocks[self.row] = num_blocks
        return dropped

    def __repr__(self) -> str:
        return f"KVCacheBlocks(tokens={self.num_tokens}, blocks={self.block_ids})"
