"""Per-sequence prefix hashing: the token ids each sequence holds, and its chain of block keys.

Token ids live here, once: declared by `allocate` (a prompt), extended by every step that
knows them, moved with the sequence on beam reorder and cut on truncate. Full blocks are keyed
from them, and registered in the prefix cache when a step commits (its K/V written).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import numpy as np

from ._rows import RowArrays
from .allocator import KVCacheAllocator
from .block import BlockHash, KVCacheBlock

__all__ = ["PrefixChain", "TokenTable", "chain_keys", "lookup_prefix"]


class TokenTable(RowArrays):
    """Token ids of every live sequence: row r's first `num_known[r]` positions are known.

    Known ids may run past a sequence's length (a prompt declared to `allocate`, not appended
    yet) or stop short of it: tokens appended without ids leave a gap, and ids after a gap are
    not recorded (nothing after it can be keyed) until a truncate cuts the sequence back to
    where ids are known.
    """

    VECTORS = ("num_known",)

    def __init__(self) -> None:
        super().__init__(np.int64, 0)

    def known(self, row: int) -> list[int]:
        return self.ids[row, : self.num_known[row]].tolist()

    def declare(self, row: int, ids: Sequence[int]) -> None:
        self.ensure_cols(len(ids))
        self.ids[row, : len(ids)] = ids
        self.num_known[row] = len(ids)

    def first_conflict(
        self, rows: np.ndarray, starts: np.ndarray, row_of: np.ndarray, pos: np.ndarray,
        ids: np.ndarray, unknown: np.ndarray | None = None,
    ) -> int | None:  # fmt: skip
        """Index into `ids` (new tokens at positions `pos` of rows `rows[row_of]`) of the first
        one that contradicts a known id, or None. Rows marked `unknown` are not checked."""
        known = self.num_known[rows]
        if not bool((known > starts).any()):
            return None
        check = pos < known[row_of]
        if unknown is not None:
            check &= ~unknown[row_of]
        stored = self.ids[rows[row_of][check], pos[check]]
        bad = np.flatnonzero(check)[stored != ids[check]]
        return int(bad[0]) if bad.size else None

    def record(
        self, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, row_of: np.ndarray,
        pos: np.ndarray, ids: np.ndarray | None, unknown: np.ndarray | None = None,
    ) -> np.ndarray:  # fmt: skip
        """New tokens `ids` at positions `pos` of rows `rows[row_of]` (row i's run from
        `starts[i]` to `ends[i]`); rows marked `unknown` (all, when `ids` is None) hold tokens
        without ids from `starts[i]` on. Returns the rows' previous `num_known`, for `restore`."""
        known = self.num_known[rows]
        if ids is None:
            unknown = np.ones(len(rows), bool)
        grows = (known >= starts) & (ends > known)  # no gap before, and ids to add
        if unknown is not None:
            grows &= ~unknown
            cut = unknown & (known > starts)  # ids declared for positions that hold others
            self.num_known[rows[cut]] = starts[cut]
        if grows.all():
            self.ensure_cols(int(ends.max()))
            self.ids[rows[row_of], pos] = ids
            self.num_known[rows] = ends
        elif grows.any():
            self.ensure_cols(int(ends.max()))
            keep = grows[row_of]
            self.ids[rows[row_of][keep], pos[keep]] = ids[keep]
            self.num_known[rows[grows]] = ends[grows]
        return known

    def restore(self, rows: np.ndarray, known: np.ndarray) -> None:
        """Undo `record`: rows know their first `known` ids again (later ones are dropped)."""
        self.num_known[rows] = known

    def truncate(self, row: int, num_tokens: int) -> None:
        self.num_known[row] = min(int(self.num_known[row]), num_tokens)

    def num_full_known(self, row: int, num_tokens: int, block_size: int) -> int:
        """Full blocks among a row's first `num_tokens` positions whose ids are all known."""
        return min(int(self.num_known[row]), num_tokens) // block_size


class PrefixChain:
    """A sequence's chain of prefix-cache keys: `keys[i]` is that of its block i, for its first
    `len(keys)` full blocks, each chained to the one before; `extra_key` namespaces them."""

    __slots__ = ("_keys", "_extra_key")

    def __init__(self, keys: Sequence[BlockHash] = (), extra_key: Hashable = None) -> None:
        self._keys = list(keys)
        self._extra_key = extra_key

    @property
    def extra_key(self) -> Hashable:
        return self._extra_key

    @property
    def num_keyed(self) -> int:
        return len(self._keys)

    def copy(self) -> PrefixChain:
        return PrefixChain(self._keys, self._extra_key)

    def truncate(self, num_tokens: int, block_size: int) -> None:
        del self._keys[num_tokens // block_size :]

    def clear(self) -> None:
        """The prefix cache was reset: key every block again from the first."""
        self._keys.clear()

    def extend(self, ids: Sequence[int], block_size: int) -> list[BlockHash]:
        """Key the next full blocks, whose tokens `ids` are (a whole number of blocks, from
        block `num_keyed` on); returns their keys, in order, and keeps them."""
        new = list(
            chain_keys(ids, self._keys[-1] if self._keys else None, block_size, self._extra_key)
        )
        self._keys.extend(new)
        return new


def chain_keys(
    ids: Sequence[int], parent: BlockHash | None, block_size: int, extra_key: Hashable
) -> Iterator[BlockHash]:
    """The keys of the full blocks of `ids`, each chained to the one before; the first to
    `parent` (that of the block before `ids`, None at a sequence's start)."""
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = BlockHash.chain(parent, ids[start : start + block_size], extra_key)
        yield parent


def lookup_prefix(
    allocators: Sequence[KVCacheAllocator],
    windows: Sequence[int | None],
    ids: Sequence[int],
    block_size: int,
    extra_key: Hashable,
) -> tuple[list[list[KVCacheBlock]], list[BlockHash], list[int]]:
    """The longest prefix of full blocks of `ids` every KV cache group holds cached: (per group
    the cached blocks to take, the prefix's keys, per group the first position they hold).

    A full-attention group needs every block of the prefix; a sliding group only those the
    next query's window reaches (the blocks covering the last `window - 1` positions). At
    least one token is left out, so the model has a query to compute.
    """
    usable = ((len(ids) - 1) // block_size) * block_size if ids else 0
    full = [g for g, w in enumerate(windows) if w is None]
    keys: list[BlockHash] = []
    found: list[list[KVCacheBlock | None]] = [[] for _ in allocators]
    for key in chain_keys(ids[:usable], None, block_size, extra_key):
        blocks = [a.lookup(key) for a in allocators]
        if any(blocks[g] is None for g in full):
            break  # a full-attention group needs every block: the prefix ends here
        keys.append(key)
        for row, block in zip(found, blocks, strict=True):
            row.append(block)
    for n in range(len(keys), 0, -1):  # the longest prefix every group can serve
        firsts = [0 if w is None else max(0, n * block_size - w + 1) // block_size for w in windows]
        if all(all(b is not None for b in f[first:n]) for f, first in zip(found, firsts)):
            starts = [first * block_size for first in firsts]
            return [f[first:n] for f, first in zip(found, firsts)], keys[:n], starts
    return [[] for _ in allocators], [], [0] * len(allocators)
