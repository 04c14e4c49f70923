"""Per-sequence rows of numpy arrays, so the hot path reads and writes many sequences at once.

Each live sequence owns one row number (`RowAllocator`), the same in every table; a table
(`RowArrays`) keeps a 2-D array `ids` and a few 1-D vectors per row, grown by doubling.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RowAllocator", "RowArrays", "ragged"]


class RowAllocator:
    """Row numbers of live sequences; freed rows are reused (lowest first)."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self.size = 0  # rows handed out at least once

    def alloc(self) -> int:
        if self._free:
            return self._free.pop()
        self.size += 1
        return self.size - 1

    def release(self, row: int) -> None:
        self._free.append(row)


class RowArrays:
    """`ids[row, col]` (a `fill`-padded 2-D array of `dtype`) and the int64 vectors `VECTORS`."""

    VECTORS: tuple[str, ...] = ()

    def __init__(self, dtype: type, fill: int, rows: int = 64, cols: int = 16) -> None:
        self._fill = fill
        self.ids = np.full((rows, cols), fill, dtype=dtype)
        for name in self.VECTORS:
            setattr(self, name, np.zeros(rows, dtype=np.int64))

    def ensure_rows(self, rows: int) -> None:
        if rows > self.ids.shape[0]:
            self._resize(max(rows, 2 * self.ids.shape[0]), self.ids.shape[1])

    def ensure_cols(self, cols: int) -> None:
        if cols > self.ids.shape[1]:
            self._resize(self.ids.shape[0], max(cols, 2 * self.ids.shape[1]))

    def _resize(self, rows: int, cols: int) -> None:
        ids = np.full((rows, cols), self._fill, dtype=self.ids.dtype)
        ids[: self.ids.shape[0], : self.ids.shape[1]] = self.ids
        self.ids = ids
        for name in self.VECTORS:
            old = getattr(self, name)
            new = np.zeros(rows, dtype=np.int64)
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def clear_row(self, row: int) -> None:
        self.ensure_rows(row + 1)
        self.ids[row] = self._fill
        for name in self.VECTORS:
            getattr(self, name)[row] = 0

    def copy_rows(self, dst: np.ndarray | int, src: np.ndarray | int) -> None:
        """Row `dst[i]` becomes a copy of row `src[i]`."""
        self.ids[dst] = self.ids[src]
        for name in self.VECTORS:
            vector = getattr(self, name)
            vector[dst] = vector[src]


def ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For `counts[i]` items per row, packed row after row: each item's row and its index
    within the row."""
    total = int(counts.sum())
    if total == len(counts) and (total == 0 or int(counts.min()) == 1):  # one per row (decode)
        return np.arange(total), np.zeros(total, np.int64)
    row_of = np.repeat(np.arange(len(counts)), counts)
    index = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return row_of, index
