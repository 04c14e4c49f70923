"""The live sequences of a pool: their block-table rows, token ids and keys, and every change.

This registry is the one writer of block-table rows and of the ref counts sequences hold, so a
row and its blocks' counts always change together. It also plans the growth of a forward step
(new blocks, copy-on-write of a shared last block, forks) all or nothing, and commits or undoes
it. Arguments are trusted: `KVCacheManager` validates them first.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from ._rows import RowAllocator
from .allocator import KVCacheAllocator, OutOfBlocksError
from .block import KVCacheBlock
from .block_table import BlockTable, KVCacheBlocks
from .paged_cache import PagedKVCache
from .prefix import PrefixChain, TokenTable

__all__ = ["Growth", "SeqState", "Sequences"]

SHORTAGE_HINT = "raise num_blocks (or memory_budget_bytes), shorten the sequences, or free some"


@dataclass(slots=True, eq=False)
class SeqState:
    """One live sequence: its row (of the block table and the token table) and its keys."""

    seq_id: Hashable
    row: int
    blocks: KVCacheBlocks
    chain: PrefixChain


@dataclass(slots=True, eq=False)
class Growth:
    """What a step changed, kept until it commits or is undone."""

    states: list[SeqState]  # the step's sequences, in order
    rows: np.ndarray  # their block-table rows
    old_lens: np.ndarray  # their token counts before the step
    num_new: np.ndarray  # tokens each one appends
    old_num_blocks: np.ndarray
    row_of: np.ndarray  # for each new token: its sequence's index in `states`
    index: np.ndarray  # and its index among that sequence's new tokens
    old_known: np.ndarray | None  # TokenTable.num_known before, when the step had ids
    flagged_before: set[SeqState]  # those that were marked maybe-shared
    copied: list[tuple[SeqState, KVCacheBlock]]  # copy-on-write: the sequence, its old block
    children: list[list[SeqState]] = field(default_factory=list)  # forks, per sequence


class Sequences:
    """Sequences by id, their rows in one `BlockTable`, and the ops that change them."""

    def __init__(self, allocator: KVCacheAllocator, cache: PagedKVCache, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.table = BlockTable()
        self.tokens = TokenTable()
        self._rows = RowAllocator()
        self._cache = cache
        self._by_id: dict[Hashable, SeqState] = {}
        # Sequences whose last block may have other holders: checked for copy-on-write when
        # a step writes into it.
        self._maybe_shared: set[SeqState] = set()
        self._open: list[Growth] = []  # growths of steps not committed or undone yet
        self._in_step: set[SeqState] = set()  # sequences those steps hold
        self.cow_copies = 0

    # ---- lookups --------------------------------------------------------------------------
    def find(self, seq_id: Hashable) -> SeqState | None:
        return self._by_id.get(seq_id)

    def find_many(self, seq_ids: Sequence[Hashable]) -> list[SeqState] | None:
        """The sequences of `seq_ids`, or None if one is not live (or not hashable)."""
        by_id = self._by_id
        try:
            return [by_id[s] for s in seq_ids]
        except (KeyError, TypeError):
            return None

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._by_id

    def __iter__(self) -> Iterator[SeqState]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def ids(self) -> list[Hashable]:
        return list(self._by_id)

    def in_step(self, states: Sequence[SeqState]) -> list[SeqState]:
        """Those of `states` that an open step holds."""
        if not self._in_step:
            return []
        return [s for s in states if s in self._in_step]

    def check_agrees(
        self,
        states: list[SeqState],
        rows: np.ndarray,
        row_of: np.ndarray,
        index: np.ndarray,
        ids: np.ndarray,
        unknown: np.ndarray | None,
    ) -> None:
        """New tokens' ids (`ids[k]`: the `index[k]`-th new token of `states[row_of[k]]`) must
        agree with the ids the sequences know already (a prompt declared to `allocate`); rows
        marked `unknown` drop their ids instead."""
        starts = self.table.num_tokens[rows]
        pos = starts[row_of] + index
        bad = self.tokens.first_conflict(rows, starts, row_of, pos, ids, unknown)
        if bad is not None:
            state = states[row_of[bad]]
            raise ValueError(
                f"sequence {state.seq_id!r}: token id {ids[bad]} at position {pos[bad]} "
                f"contradicts {self.tokens.ids[state.row, pos[bad]]}, the prompt given to "
                "allocate"
            )

    def rows(self, states: Sequence[SeqState]) -> np.ndarray:
        return np.fromiter(map(_ROW, states), np.int64, len(states))

    # ---- one sequence ---------------------------------------------------------------------
    def add(
        self,
        seq_id: Hashable,
        blocks: list[KVCacheBlock],
        num_tokens: int,
        chain: PrefixChain,
        token_ids: Sequence[int] = (),
    ) -> SeqState:
        """A new sequence holding `blocks` (whose references the caller took), with the ids
        of its first tokens (a declared prompt may run past `num_tokens`)."""
        row = self._rows.alloc()
        state = SeqState(seq_id, row, KVCacheBlocks(self.table, self.allocator.blocks, row), chain)
        state.blocks.extend(blocks)
        state.blocks.set_num_tokens(num_tokens)
        self.tokens.clear_row(row)
        self.tokens.declare(row, token_ids)
        self._by_id[seq_id] = state
        return state

    def fork(self, parent: SeqState, child_id: Hashable) -> SeqState:
        self.allocator.touch(parent.blocks.blocks)
        child = self.add(child_id, [], 0, parent.chain.copy())
        self.table.copy_rows(child.row, parent.row)
        self.tokens.copy_rows(child.row, parent.row)
        self._maybe_shared.update((parent, child))
        return child

    def remove(self, state: SeqState) -> None:
        """Drop a sequence (its blocks' data stays, cached if registered)."""
        self.allocator.free(state.blocks.blocks[::-1])
        self._maybe_shared.discard(state)
        self._in_step.discard(state)
        state.blocks.release()
        self.tokens.clear_row(state.row)
        self._rows.release(state.row)
        del self._by_id[state.seq_id]

    def truncate(self, state: SeqState, num_tokens: int) -> None:
        bs = self.block_size
        self.allocator.free(state.blocks.truncate(-(-num_tokens // bs)))
        state.blocks.set_num_tokens(num_tokens)
        self.tokens.truncate(state.row, num_tokens)
        state.chain.truncate(num_tokens, bs)
        if num_tokens % bs:
            last = state.blocks.last
            if last.ref_count > 1:
                self._maybe_shared.add(state)  # the next write copies it
            else:
                self.allocator.unregister(last)  # its tail will be overwritten in place

    def register_full_blocks(self, state: SeqState, num_tokens: int | None = None) -> None:
        """Register the sequence's full blocks (of its first `num_tokens` tokens, by default
        all) whose ids are known and that are not keyed yet."""
        if not self.allocator.enable_prefix_caching:
            return
        bs = self.block_size
        row, keyed = state.row, state.chain.num_keyed
        if num_tokens is None:
            num_tokens = state.blocks.num_tokens
        full = self.tokens.num_full_known(row, num_tokens, bs)
        if full <= keyed:
            return
        keys = state.chain.extend(self.tokens.ids[row, keyed * bs : full * bs].tolist(), bs)
        pool = self.allocator.blocks
        for block_id, key in zip(self.table.ids[row, keyed:full].tolist(), keys):
            self.allocator.register(pool[block_id], key)

    def reset_keys(self) -> None:
        """The prefix cache was reset: every sequence keys its blocks again."""
        for state in self._by_id.values():
            state.chain.clear()

    # ---- many sequences -------------------------------------------------------------------
    def reorder(self, states: list[SeqState], src: np.ndarray) -> None:
        """`states[i]` becomes a copy of `states[src[i]]`; only ref counts change."""
        changed = np.flatnonzero(src != np.arange(len(states)))
        if changed.size == 0:
            return
        rows = self.rows(states)
        dst_rows, src_rows = rows[changed], rows[src[changed]]
        n = self.allocator.num_blocks
        delta = self.table.block_counts(src_rows, n) - self.table.block_counts(dst_rows, n)
        pool = self.allocator.blocks
        for b in np.flatnonzero(delta > 0):  # add holders first: nothing is freed transiently
            self.allocator.touch([pool[b]] * int(delta[b]))
        for b in np.flatnonzero(delta < 0):
            self.allocator.free([pool[b]] * int(-delta[b]))
        self.table.copy_rows(dst_rows, src_rows)
        self.tokens.copy_rows(dst_rows, src_rows)
        old = [(s.chain, s in self._maybe_shared) for s in states]
        counts = np.bincount(src, minlength=len(states))
        for i in changed.tolist():
            j = int(src[i])
            chain, shared = old[j]
            states[i].chain = chain.copy()
            if shared or counts[j] > 1:
                self._maybe_shared.update((states[i], states[j]))
            else:
                self._maybe_shared.discard(states[i])

    def grow(
        self,
        states: list[SeqState],
        rows: np.ndarray,
        num_new: np.ndarray,
        new_tokens: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None],
        forks: Sequence[Sequence[Hashable]] | None,
    ) -> Growth:
        """Reserve `num_new[i]` more tokens for each sequence (of block-table row `rows[i]`),
        then fork `forks[i]` off it. `new_tokens` is `ragged(num_new)` plus the new tokens'
        ids (None: unknown) and the rows whose ids are unknown anyway (None: none).

        All or nothing: `OutOfBlocksError` if the pool is short, and nothing changed. A shared
        last block that a sequence writes into is copied first; when every holder of a block
        writes into it in this step, the longest stays in place (nobody else reads the slots
        it overwrites, so an undo can give the others their old block back).
        """
        bs = self.block_size
        table = self.table
        lens = table.num_tokens[rows]
        num_blocks = table.num_blocks[rows]
        need = np.maximum((lens + num_new + bs - 1) // bs - num_blocks, 0)
        copy, sole = self._plan_copies(states, lens, num_new)
        total = int(need.sum()) + len(copy)
        free = self.allocator.num_free_blocks
        if total > free:
            raise OutOfBlocksError(total, free, self.allocator.num_blocks, hint=SHORTAGE_HINT)

        # Past the last check: nothing below fails.
        flagged = self._maybe_shared.intersection(states)
        for i in sole:
            state = states[i]
            self._maybe_shared.discard(state)
            last = state.blocks.last
            if lens[i] % bs and last is not None:
                # Registered for its full contents (truncated while shared); this step
                # overwrites its tail, so it leaves the prefix index.
                self.allocator.unregister(last)
        copied = []
        if copy:
            pairs = []
            for i, new in zip(copy, self.allocator.allocate(len(copy))):
                state = states[i]
                old = state.blocks.last
                # The old block keeps this sequence's reference until the step ends: held
                # for an undo.
                state.blocks.replace_last(new)
                self._maybe_shared.discard(state)
                copied.append((state, old))
                pairs.append((old.block_id, new.block_id))
            self._cache.copy(pairs)
        if total > len(copy):
            table.append_blocks(rows, need, self.allocator.allocate(total - len(copy)))
        ends = lens + num_new
        table.num_tokens[rows] = ends
        row_of, index, ids, unknown = new_tokens
        old_known = None
        if ids is not None or unknown is not None:
            pos = lens[row_of] + index
            old_known = self.tokens.record(rows, lens, ends, row_of, pos, ids, unknown)
        growth = Growth(
            states, rows, lens, num_new, num_blocks, row_of, index, old_known, flagged, copied
        )
        if forks is not None:
            growth.children = [
                [self.fork(state, child_id) for child_id in ids]
                for state, ids in zip(states, forks)
            ]
        self._open.append(growth)
        self._in_step.update(states)
        for children in growth.children:
            self._in_step.update(children)
        return growth

    def _plan_copies(
        self, states: list[SeqState], lens: np.ndarray, num_new: np.ndarray
    ) -> tuple[list[int], list[int]]:
        """Which sequences copy their last block before writing (copy-on-write), and which
        turn out to be its only holder."""
        if not self._maybe_shared:
            return [], []
        bs = self.block_size
        sole, writers = [], {}
        for i, state in enumerate(states):
            if state not in self._maybe_shared:
                continue
            last = state.blocks.last
            if last is None or last.ref_count == 1:
                sole.append(i)
            elif num_new[i] and lens[i] % bs:
                writers.setdefault(last.block_id, []).append(i)
        copy = []
        for block_id, members in writers.items():
            if self.allocator.blocks[block_id].ref_count == len(members):
                # Every holder writes into it here: the longest writes in place.
                keep = max(members, key=lambda i: lens[i])
                sole.append(keep)
                copy += [i for i in members if i != keep]
            else:
                copy += members
        return copy, sole

    def commit(self, growth: Growth) -> None:
        """The step's K/V are written: register the blocks it filled, drop its holds."""
        self._open.remove(growth)
        self.allocator.free([old for _, old in growth.copied])
        self.cow_copies += len(growth.copied)
        bs = self.block_size
        ends = growth.old_lens + growth.num_new
        filled = np.flatnonzero(ends // bs > growth.old_lens // bs)
        for i, end in zip(filled.tolist(), ends[filled].tolist()):
            self.register_full_blocks(growth.states[i], end)
        for state, children in zip(growth.states, growth.children):
            for child in children:
                child.chain = state.chain.copy()
        self._release(growth)

    def undo(self, growth: Growth) -> None:
        """The step failed: every sequence is as before it (forks dropped, blocks freed)."""
        self._open.remove(growth)
        for children in growth.children:
            for child in children:
                self.remove(child)
        if growth.old_known is not None:
            self.tokens.restore(growth.rows, growth.old_known)
        pool = self.allocator.blocks
        dropped = self.table.cut_rows(growth.rows, growth.old_num_blocks)
        self.allocator.free([pool[i] for i in dropped.tolist()])
        for state, old in growth.copied:
            copy = state.blocks.last
            state.blocks.replace_last(old)  # its hold becomes the sequence's again
            self.allocator.free([copy])
        self.table.num_tokens[growth.rows] = growth.old_lens
        self._maybe_shared.difference_update(growth.states)
        self._maybe_shared.update(growth.flagged_before)
        self._release(growth)

    def _release(self, growth: Growth) -> None:
        self._in_step.difference_update(growth.states)
        for children in growth.children:
            self._in_step.difference_update(children)

    # ---- checks ---------------------------------------------------------------------------
    def holders(self) -> dict[int, int]:
        """block id -> references held (by rows, and by open steps for their undo)."""
        owners: dict[int, int] = {}
        bs = self.block_size
        for state in self._by_id.values():
            assert len(state.blocks) == -(-state.blocks.num_tokens // bs), (
                f"sequence {state.seq_id!r}: {len(state.blocks)} blocks for "
                f"{state.blocks.num_tokens} tokens"
            )
            for b in state.blocks.block_ids:
                owners[b] = owners.get(b, 0) + 1
        for growth in self._open:
            for _, old in growth.copied:
                owners[old.block_id] = owners.get(old.block_id, 0) + 1
        return owners


_ROW = attrgetter("row")
