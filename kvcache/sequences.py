"""The live sequences of a pool: their block-table rows, token ids and keys, and every change.

This registry is the one writer of block-table rows and of the ref counts sequences hold, so a
row and its blocks' counts always change together. Each KV cache group (full attention, or one
sliding window) has its own allocator and block table (`groups.py`); a sequence has one row
number, the same in every table. The registry also plans the growth of a forward step (new
blocks, copy-on-write of a shared last block, forks, what a sliding window keeps) all or
nothing, and commits or undoes it. Arguments are trusted: `KVCacheManager` validates them
first.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from ._rows import RowAllocator
from .allocator import KVCacheAllocator, OutOfBlocksError
from .block import KVCacheBlock
from .block_table import ABSENT, BlockTable, KVCacheBlocks
from .config import CROP_STEP
from .groups import Group, GroupGrowth, safe_ends
from .paged_cache import PagedKVCache
from .prefix import PrefixChain, TokenTable

__all__ = ["Growth", "SeqState", "Sequences"]

SHORTAGE_HINT = "raise num_blocks (or memory_budget_bytes), shorten the sequences, or free some"


@dataclass(slots=True, eq=False)
class SeqState:
    """One live sequence: its row (of every group's block table and of the token table), its
    blocks per group, and its keys."""

    seq_id: Hashable
    row: int
    blocks: tuple[KVCacheBlocks, ...]
    chain: PrefixChain


@dataclass(slots=True, eq=False)
class Growth:
    """What a step changed, kept until it commits or is undone."""

    states: list[SeqState]  # the step's sequences, in order
    rows: np.ndarray  # their rows
    old_lens: np.ndarray  # their token counts before the step
    num_new: np.ndarray  # tokens each one appends
    row_of: np.ndarray  # for each new token: its sequence's index in `states`
    index: np.ndarray  # and its index among that sequence's new tokens
    old_known: np.ndarray | None  # TokenTable.num_known before, when the step recorded ids
    groups: list[GroupGrowth]
    children: list[list[SeqState]] = field(default_factory=list)  # forks, per sequence

    def child_rows(self) -> np.ndarray:
        return np.fromiter((c.row for kids in self.children for c in kids), np.int64)


class Sequences:
    """Sequences by id, their rows in each group's `BlockTable`, and the ops that change them."""

    def __init__(self, allocators: list[KVCacheAllocator], cache: PagedKVCache) -> None:
        config = cache.config
        self.block_size = config.block_size
        self.groups = [
            Group(g, grp.window, allocator, BlockTable(), config.block_size)
            for g, (grp, allocator) in enumerate(zip(config.groups, allocators, strict=True))
        ]
        self.sliding = any(g.window is not None for g in self.groups)
        self.tokens = TokenTable()
        self._rows = RowAllocator()
        self._cache = cache
        self._by_id: dict[Hashable, SeqState] = {}
        self._open: list[Growth] = []  # growths of steps not committed or undone yet
        self._in_step: set[SeqState] = set()  # sequences those steps hold
        self.cow_copies = 0

    @property
    def lengths(self) -> np.ndarray:
        """Token count per row (kept alike in every group's table)."""
        return self.groups[0].table.num_tokens

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
        starts = self.lengths[rows]
        pos = starts[row_of] + index
        bad = self.tokens.first_conflict(rows, starts, row_of, pos, ids, unknown)
        if bad is not None:
            state = states[row_of[bad]]
            raise ValueError(
                f"sequence {state.seq_id!r}: token id {ids[bad]} at position {pos[bad]} "
                f"contradicts {self.tokens.ids[state.row, pos[bad]]}, the prompt given to "
                "allocate"
            )

    def check_truncate(self, state: SeqState, num_tokens: int) -> None:
        """A sliding group must still hold the window a query after `num_tokens` sees."""
        for group in self.groups:
            if group.window is None:
                continue
            needed = max(0, num_tokens - group.window + 1)
            held = state.blocks[group.index].stored_from
            if needed < held:
                raise ValueError(
                    f"cannot truncate {state.seq_id!r} to {num_tokens} tokens: a query after "
                    f"them sees positions {needed}.. through its sliding window of "
                    f"{group.window}, and the cache holds that layer group's K/V from position "
                    f"{held} on (a sliding window keeps what a crop back into the last step, if "
                    f"of at most {CROP_STEP} tokens, needs; pass keep= to step for more)"
                )

    def rows(self, states: Sequence[SeqState]) -> np.ndarray:
        return np.fromiter(map(_ROW, states), np.int64, len(states))

    # ---- one sequence ---------------------------------------------------------------------
    def add(
        self,
        seq_id: Hashable,
        blocks: Sequence[list[KVCacheBlock]],
        num_tokens: int,
        chain: PrefixChain,
        token_ids: Sequence[int] = (),
        stored_from: Sequence[int] | None = None,
    ) -> SeqState:
        """A new sequence holding `blocks[g]` in each group (whose references the caller took),
        the K/V of positions `stored_from[g]` on (the entries of the blocks wholly before are
        ABSENT), with the ids of its first tokens (a declared prompt may run past
        `num_tokens`)."""
        row = self._rows.alloc()
        rows = []
        for group, held, start in zip(
            self.groups, blocks, stored_from or [0] * len(self.groups), strict=True
        ):
            view = KVCacheBlocks(group.table, group.allocator.blocks, row)
            view.extend(held, start // self.block_size)
            view.set_num_tokens(num_tokens)
            group.table.stored_from[row] = start
            rows.append(view)
        state = SeqState(seq_id, row, tuple(rows), chain)
        self.tokens.clear_row(row)
        self.tokens.declare(row, token_ids)
        self._by_id[seq_id] = state
        return state

    def fork(self, parent: SeqState, child_id: Hashable) -> SeqState:
        child = self.add(child_id, [[]] * len(self.groups), 0, parent.chain.copy())
        for group, view in zip(self.groups, parent.blocks, strict=True):
            group.allocator.touch(view.blocks)
            group.table.copy_rows(child.row, parent.row)
            group.maybe_shared.update((parent, child))
        self.tokens.copy_rows(child.row, parent.row)
        return child

    def remove(self, state: SeqState) -> None:
        """Drop a sequence (its blocks' data stays, cached if registered)."""
        for group, view in zip(self.groups, state.blocks, strict=True):
            group.allocator.free(view.blocks[::-1])
            group.maybe_shared.discard(state)
            view.release()
        self._in_step.discard(state)
        self.tokens.clear_row(state.row)
        self._rows.release(state.row)
        del self._by_id[state.seq_id]

    def truncate(self, state: SeqState, num_tokens: int) -> None:
        bs = self.block_size
        for group, view in zip(self.groups, state.blocks, strict=True):
            group.allocator.free(view.truncate(-(-num_tokens // bs)))
            view.set_num_tokens(num_tokens)
            if num_tokens % bs:
                last = view.last
                if last.ref_count > 1:
                    group.maybe_shared.add(state)  # the next write copies it
                else:
                    group.allocator.unregister(last)  # its tail will be overwritten in place
        self.tokens.truncate(state.row, num_tokens)
        state.chain.truncate(num_tokens, bs)

    def register_full_blocks(self, state: SeqState, num_tokens: int | None = None) -> None:
        """Register the sequence's full blocks (of its first `num_tokens` tokens, by default
        all) whose ids are known and that are not keyed yet, in every group that holds them
        whole."""
        if not self.groups[0].allocator.enable_prefix_caching:
            return
        bs = self.block_size
        row, keyed = state.row, state.chain.num_keyed
        if num_tokens is None:
            num_tokens = int(self.lengths[row])
        full = self.tokens.num_full_known(row, num_tokens, bs)
        if full <= keyed:
            return
        keys = state.chain.extend(self.tokens.ids[row, keyed * bs : full * bs].tolist(), bs)
        for group in self.groups:
            pool = group.allocator.blocks
            first = keyed
            if group.window is not None:  # from the first block it holds whole
                first = max(keyed, -(-int(group.table.stored_from[row]) // bs))
            ids = group.table.ids[row, first:full].tolist()
            for block_id, key in zip(ids, keys[first - keyed :]):
                if block_id >= 0:
                    group.allocator.register(pool[block_id], key)

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
        counts = np.bincount(src, minlength=len(states))
        for group in self.groups:
            pool = group.allocator.blocks
            n = len(pool)
            table = group.table
            delta = table.block_counts(src_rows, n) - table.block_counts(dst_rows, n)
            for b in np.flatnonzero(delta > 0):  # add holders first: nothing freed transiently
                group.allocator.touch([pool[b]] * int(delta[b]))
            for b in np.flatnonzero(delta < 0):
                group.allocator.free([pool[b]] * int(-delta[b]))
            table.copy_rows(dst_rows, src_rows)
            shared = [s in group.maybe_shared for s in states]
            for i in changed.tolist():
                j = int(src[i])
                if shared[j] or counts[j] > 1:
                    group.maybe_shared.update((states[i], states[j]))
                else:
                    group.maybe_shared.discard(states[i])
        self.tokens.copy_rows(dst_rows, src_rows)
        chains = [s.chain for s in states]
        for i in changed.tolist():
            states[i].chain = chains[int(src[i])].copy()

    def grow(
        self,
        states: list[SeqState],
        rows: np.ndarray,
        num_new: np.ndarray,
        new_tokens: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None],
        forks: Sequence[Sequence[Hashable]] | None,
        keep: int | None = None,
    ) -> Growth:
        """Reserve `num_new[i]` more tokens for each sequence (of row `rows[i]`), then fork
        `forks[i]` off it. `new_tokens` is `ragged(num_new)` plus the new tokens' ids (None:
        unknown) and the rows whose ids are unknown anyway (None: none). A sliding group keeps
        what a crop of `keep` tokens needs (None: a short step's; see `groups.safe_ends`).

        All or nothing: `OutOfBlocksError` if a group's pool is short, and nothing changed. A
        shared last block that a sequence writes into is copied first; when every holder of a
        block writes into it in this step, the longest stays in place (nobody else reads the
        slots it overwrites, so an undo can give the others their old block back).
        """
        lens = self.lengths[rows]
        ends = lens + num_new
        safe_end = safe_ends(num_new, ends, keep) if self.sliding else None
        plans = [group.plan(states, rows, lens, ends, safe_end) for group in self.groups]
        for group, plan in zip(self.groups, plans, strict=True):
            total = int(plan.alloc.sum()) + len(plan.copy)
            free = group.allocator.num_free_blocks
            if total > free:
                raise OutOfBlocksError(total, free, group.allocator.num_blocks, hint=SHORTAGE_HINT)

        # Past the last check: nothing below fails.
        grown = [
            group.grow(states, rows, lens, plan, self._cache)
            for group, plan in zip(self.groups, plans, strict=True)
        ]
        for group in self.groups:
            group.table.num_tokens[rows] = ends
        row_of, index, ids, unknown = new_tokens
        old_known = None
        if ids is not None or unknown is not None:
            pos = lens[row_of] + index
            old_known = self.tokens.record(rows, lens, ends, row_of, pos, ids, unknown)
        growth = Growth(states, rows, lens, num_new, row_of, index, old_known, grown)
        if forks is not None:
            growth.children = [
                [self.fork(state, child_id) for child_id in ids]
                for state, ids in zip(states, forks, strict=True)
            ]
        self._open.append(growth)
        self._in_step.update(states)
        for children in growth.children:
            self._in_step.update(children)
        return growth

    def commit(self, growth: Growth) -> None:
        """The step's K/V are written: register the blocks it filled, release what a sliding
        window no longer needs, drop the step's holds."""
        self._open.remove(growth)
        for group, grown in zip(self.groups, growth.groups, strict=True):
            group.allocator.free([old for _, old in grown.copied])
            self.cow_copies += len(grown.copied)
        bs = self.block_size
        ends = growth.old_lens + growth.num_new
        filled = np.flatnonzero(ends // bs > growth.old_lens // bs)
        for i, end in zip(filled.tolist(), ends[filled].tolist()):
            self.register_full_blocks(growth.states[i], end)
        for state, children in zip(growth.states, growth.children, strict=False):
            for child in children:
                child.chain = state.chain.copy()
        for group, grown in zip(self.groups, growth.groups, strict=True):
            if grown.release_to is not None:
                rows, upto = growth.rows, grown.release_to
                if growth.children:  # forks share the parent's entries: they release alike
                    copies = np.fromiter((len(c) for c in growth.children), np.int64)
                    rows = np.concatenate([rows, growth.child_rows()])
                    upto = np.concatenate([upto, np.repeat(upto, copies)])
                group.release(grown, rows, upto)
        self._release(growth)

    def undo(self, growth: Growth) -> None:
        """The step failed: every sequence is as before it (forks dropped, blocks freed)."""
        self._open.remove(growth)
        for children in growth.children:
            for child in children:
                self.remove(child)
        if growth.old_known is not None:
            self.tokens.restore(growth.rows, growth.old_known)
        for group, grown in zip(self.groups, growth.groups, strict=True):
            group.undo(grown, growth.states, growth.rows, growth.old_lens)
        self._release(growth)

    def _release(self, growth: Growth) -> None:
        self._in_step.difference_update(growth.states)
        for children in growth.children:
            self._in_step.difference_update(children)

    # ---- checks ---------------------------------------------------------------------------
    def holders(self, group: int) -> dict[int, int]:
        """block id -> references held in a group (by rows, and by open steps for their undo)."""
        owners: dict[int, int] = {}
        bs = self.block_size
        for state in self._by_id.values():
            view = state.blocks[group]
            assert len(view) == -(-view.num_tokens // bs), (
                f"sequence {state.seq_id!r}: {len(view)} entries for {view.num_tokens} tokens"
            )
            for b in view.block_ids:
                if b != ABSENT:
                    owners[b] = owners.get(b, 0) + 1
        for growth in self._open:
            for _, old in growth.groups[group].copied:
                owners[old.block_id] = owners.get(old.block_id, 0) + 1
        return owners


_ROW = attrgetter("row")
