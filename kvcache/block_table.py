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
ABSENT = -1  # entry of a block released out of a sliding window: no query reads it


class BlockTable(RowArrays):
    """Block-table rows of all live sequences in one KV cache group: row r holds a sequence's
    block ids (`ids[r, :num_blocks[r]]`) and its token count. In a sliding-window group the
    first `num_absent[r]` entries are ABSENT (released), and the row holds the K/V of positions
    `stored_from[r]` on (0 in a full-attention group; `num_absent == stored_from // block_size`
    once a step is committed, while an open step may leave more entries ABSENT)."""

    VECTORS = ("num_blocks", "num_tokens", "num_absent", "stored_from")

    def __init__(self) -> None:
        super().__init__(np.int32, PAD_BLOCK)

    def tables(self, rows: np.ndarray) -> np.ndarray:
        """`[len(rows), width]` int32 block ids; width = most blocks of a row (at least 1)."""
        width = max(int(self.num_blocks[rows].max(initial=0)), 1)
        return self.ids[rows, :width]

    def append_blocks(
        self,
        rows: np.ndarray,
        counts: np.ndarray,
        absent: np.ndarray | None,
        blocks: Sequence[KVCacheBlock],
    ) -> None:
        """Append `counts[i]` entries to row `rows[i]`: `absent[i]` ABSENT ones (None: none),
        then the next of `blocks`, in order."""
        starts = self.num_blocks[rows]
        ends = starts + counts
        self.ensure_cols(int(ends.max()))
        ids = np.fromiter((b.block_id for b in blocks), np.int32, len(blocks))
        if absent is not None and not absent.any():
            absent = None
        if absent is None and int(counts.max()) == 1:  # a decode step: one block where due
            grown = np.flatnonzero(counts)
            self.ids[rows[grown], starts[grown]] = ids
        else:
            row_of, index = ragged(counts)
            if absent is None:
                entries = ids
            else:
                entries = np.full(len(row_of), ABSENT, np.int32)
                entries[index >= absent[row_of]] = ids
            self.ids[rows[row_of], starts[row_of] + index] = entries
        self.num_blocks[rows] = ends

    def cut_rows(self, rows: np.ndarray, num_blocks: np.ndarray) -> np.ndarray:
        """Rows keep their first `num_blocks[i]` blocks; returns the ids of those dropped."""
        dropped = self._take(rows, num_blocks, self.num_blocks[rows] - num_blocks, PAD_BLOCK)
        self.num_blocks[rows] = num_blocks
        return dropped

    def release_front(self, rows: np.ndarray, upto: np.ndarray) -> np.ndarray:
        """Rows mark their entries before `upto[i]` ABSENT; returns the ids released."""
        lo = self.num_absent[rows]
        count = np.maximum(np.minimum(upto, self.num_blocks[rows]) - lo, 0)
        released = self._take(rows, lo, count, ABSENT)
        self.num_absent[rows] = lo + count
        return released

    def _take(self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray, fill: int):
        """Set `counts[i]` entries of row `rows[i]` from `starts[i]` to `fill`; returns the ids
        they held."""
        if not counts.any():
            return np.empty(0, np.int32)
        row_of, index = ragged(counts)
        cols = starts[row_of] + index
        taken = self.ids[rows[row_of], cols]
        self.ids[rows[row_of], cols] = fill
        return taken

    def block_counts(self, rows: np.ndarray, pool_size: int) -> np.ndarray:
        """`[pool_size]` int64: how many times each block id appears in `rows`."""
        width = int(self.num_blocks[rows].max(initial=0))
        ids = self.ids[rows, :width]
        used = (np.arange(width) < self.num_blocks[rows][:, None]) & (ids >= 0)
        return np.bincount(ids[used], minlength=pool_size)


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
        """Its entries: block ids, ABSENT (-1) for blocks released out of a sliding window."""
        return self._table.ids[self._row, : len(self)].tolist()

    @property
    def num_absent(self) -> int:
        """Leading entries released out of a sliding window (ABSENT)."""
        return int(self._table.num_absent[self._row])

    @property
    def stored_from(self) -> int:
        """The first position whose K/V it holds (every later one is held too)."""
        return int(self._table.stored_from[self._row])

    @property
    def blocks(self) -> list[KVCacheBlock]:
        """The blocks it holds, in order (absent entries skipped)."""
        return [self._pool[i] for i in self.block_ids if i != ABSENT]

    def __iter__(self) -> Iterator[KVCacheBlock]:
        return iter(self.blocks)

    def __getitem__(self, index: int) -> KVCacheBlock:
        n = len(self)
        if index < 0:
            index += n
        if not self.num_absent <= index < n:
            raise IndexError(
                f"block index {index} out of range for {n} blocks ({self.num_absent} released)"
            )
        return self._pool[int(self._table.ids[self._row, index])]

    @property
    def last(self) -> KVCacheBlock | None:
        n = len(self)
        return self._pool[int(self._table.ids[self._row, n - 1])] if n else None

    def __repr__(self) -> str:
        return f"KVCacheBlocks(tokens={self.num_tokens}, blocks={self.block_ids})"

    # ---- writes (the sequence registry's) -------------------------------------------------
    def extend(self, blocks: Sequence[KVCacheBlock], absent: int = 0) -> None:
        """Append `absent` ABSENT entries (only to an empty row), then `blocks`."""
        n = len(self)
        assert not absent or n == 0, "absent entries lead a row"
        ids = [ABSENT] * absent + [b.block_id for b in blocks]
        self._table.ensure_cols(n + len(ids))
        self._table.ids[self._row, n : n + len(ids)] = ids
        self._table.num_blocks[self._row] = n + len(ids)
        self._table.num_absent[self._row] += absent

    def replace_last(self, block: KVCacheBlock) -> None:
        self._table.ids[self._row, len(self) - 1] = block.block_id

    def set_num_tokens(self, num_tokens: int) -> None:
        self._table.num_tokens[self._row] = num_tokens

    def truncate(self, num_blocks: int) -> list[KVCacheBlock]:
        """Drop the entries past the first `num_blocks`; returns the blocks dropped, tail
        first (the caller checked that a sliding window keeps what it needs)."""
        absent = self.num_absent
        dropped = [self._pool[i] for i in self.block_ids[num_blocks:] if i != ABSENT][::-1]
        self._table.ids[self._row, num_blocks : len(self)] = PAD_BLOCK
        self._table.num_blocks[self._row] = num_blocks
        self._table.num_absent[self._row] = min(absent, num_blocks)
        return dropped

    def release(self) -> None:
        """Clear the row (the registry freed the blocks and reuses the row number)."""
        self._table.clear_row(self._row)
        self._row = -1
