"""Block-table rows: the ordered blocks each sequence owns, as one numpy table.

The hot path (a decode step for hundreds of sequences) reads and writes many rows at once, so
block ids and token counts live in shared arrays; `KVCacheBlocks` is one sequence's view of its
row, for code that handles one sequence at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ._rows import RowArrays, ragged
from .block import KVCacheBlock

__all__ = ["BlockTable", "KVCacheBlocks"]

PAD_BLOCK = 0  # entry past a row's blocks: a valid id, never read (attention stops at seq_len)


class BlockTable(RowArrays):
    """Block-table rows of all live sequences: row r holds a sequence's block ids
    (`ids[r, :num_blocks[r]]`) and its token count."""

    VECTORS = ("num_blocks", "num_tokens")

    def __init__(self) -> None:
        super().__init__(np.int32, PAD_BLOCK)

    def tables(self, rows: np.ndarray) -> np.ndarray:
        """`[len(rows), width]` int32 block ids; width = most blocks of a row (at least 1)."""
        width = max(int(self.num_blocks[rows].max(initial=0)), 1)
        return self.ids[rows, :width]

    def append_blocks(
        self, rows: np.ndarray, counts: np.ndarray, blocks: Sequence[KVCacheBlock]
    ) -> None:
        """Append `blocks` to the rows, `counts[i]` of them to row `rows[i]`, in order."""
        starts = self.num_blocks[rows]
        ends = starts + counts
        self.ensure_cols(int(ends.max()))
        ids = np.fromiter((b.block_id for b in blocks), np.int32, len(blocks))
        if int(counts.max()) == 1:  # a decode step: one new block for the rows that filled one
            grown = np.flatnonzero(counts)
            self.ids[rows[grown], starts[grown]] = ids
        else:
            row_of, index = ragged(counts)
            self.ids[rows[row_of], starts[row_of] + index] = ids
        self.num_blocks[rows] = ends

    def cut_rows(self, rows: np.ndarray, num_blocks: np.ndarray) -> np.ndarray:
        """Rows keep their first `num_blocks[i]` blocks; returns the ids of those dropped."""
        extra = self.num_blocks[rows] - num_blocks
        if not extra.any():
            return np.empty(0, np.int32)
        row_of, index = ragged(extra)
        cols = num_blocks[row_of] + index
        dropped = self.ids[rows[row_of], cols]
        self.ids[rows[row_of], cols] = PAD_BLOCK
        self.num_blocks[rows] = num_blocks
        return dropped

    def block_counts(self, rows: np.ndarray, pool_size: int) -> np.ndarray:
        """`[pool_size]` int64: how many times each block id appears in `rows`."""
        width = int(self.num_blocks[rows].max(initial=0))
        used = np.arange(width) < self.num_blocks[rows][:, None]
        return np.bincount(self.ids[rows, :width][used], minlength=pool_size)


class KVCacheBlocks:
    """The ordered blocks of one sequence: its row of a `BlockTable`, read as blocks.

    Reads are public; the sequence registry (`sequences.py`) is the one writer, through the
    methods below, so the row and the blocks' ref counts always change together.
    """

    __slots__ = ("_table", "_pool", "_row")

    def __init__(self, table: BlockTable, pool: Sequence[KVCacheBlock], row: int) -> None:
        self._table = table
        self._pool = pool  # all blocks of the allocator, indexed by block id
        self._row = row
        table.clear_row(row)

    @property
    def row(self) -> int:
        """This sequence's row of the block table."""
        return self._row

    @property
    def num_tokens(self) -> int:
        return int(self._table.num_tokens[self._row])

    def __len__(self) -> int:
        return int(self._table.num_blocks[self._row])

    @property
    def block_ids(self) -> list[int]:
        return self._table.ids[self._row, : len(self)].tolist()

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
        return self._pool[int(self._table.ids[self._row, index])]

    @property
    def last(self) -> KVCacheBlock | None:
        n = len(self)
        return self._pool[int(self._table.ids[self._row, n - 1])] if n else None

    def __repr__(self) -> str:
        return f"KVCacheBlocks(tokens={self.num_tokens}, blocks={self.block_ids})"

    # ---- writes (the sequence registry's) -------------------------------------------------
    def extend(self, blocks: Sequence[KVCacheBlock]) -> None:
        n = len(self)
        self._table.ensure_cols(n + len(blocks))
        self._table.ids[self._row, n : n + len(blocks)] = [b.block_id for b in blocks]
        self._table.num_blocks[self._row] = n + len(blocks)

    def replace_last(self, block: KVCacheBlock) -> None:
        self._table.ids[self._row, len(self) - 1] = block.block_id

    def set_num_tokens(self, num_tokens: int) -> None:
        self._table.num_tokens[self._row] = num_tokens

    def truncate(self, num_blocks: int) -> list[KVCacheBlock]:
        """Drop the blocks past the first `num_blocks`; returns them, tail first."""
        dropped = self.blocks[num_blocks:][::-1]
        self._table.ids[self._row, num_blocks : len(self)] = PAD_BLOCK
        self._table.num_blocks[self._row] = num_blocks
        return dropped

    def release(self) -> None:
        """Clear the row (the registry freed the blocks and reuses the row number)."""
        self._table.clear_row(self._row)
        self._row = -1
