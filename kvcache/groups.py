"""A KV cache group's share of the sequence registry, and how one step grows it.

Each KV cache group (full attention, or one sliding window) has its own allocator and block
table. A step plans each group alone (`Group.plan`: new entries, the blocks to allocate, which
shared last blocks to copy before writing into them), and once every group's pool is known to
have room, applies the plans (`Group.grow`); `commit` and `undo` finish the group's part.

Sequences come in as the registry's `SeqState`s (their `blocks[g]` is their row here).

A sliding-window group keeps only what future queries can see, and what a crop may need. A
step has a "safe end", the shortest length a crop may leave (`safe_ends`): by default its start
when it has at most `CROP_STEP` tokens (assisted decoding crops back into its candidates), its
end when it is longer (a prompt); `keep` moves it to `keep` tokens before the end. The group
stores the new tokens from `stored_from` on (those the window of the safe end, or later, sees),
and on commit the blocks wholly before that window go back to the pool (their entries become
ABSENT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .allocator import KVCacheAllocator
from .block import KVCacheBlock
from .block_table import BlockTable
from .config import CROP_STEP
from .paged_cache import PagedKVCache

__all__ = ["Group", "GroupGrowth", "GroupPlan", "safe_ends"]


def safe_ends(num_new: np.ndarray, ends: np.ndarray, keep: int | None) -> np.ndarray:
    """Per sequence, the shortest length a later crop may leave (see the module docstring)."""
    if keep is None:  # a crop back into a short step; none into a long one
        back = np.where(num_new <= CROP_STEP, num_new, 0)
    else:
        back = np.full(len(ends), keep, np.int64)
    return np.maximum(ends - back, 0)


class GroupPlan(NamedTuple):
    """A step's plan in one group."""

    stored_from: np.ndarray  # per sequence: the first new position stored in this group
    alloc: np.ndarray  # blocks to allocate per sequence
    copy: list[int]  # sequences that copy their shared last block before writing into it
    sole: list[int]  # sequences found to be their last block's only holder
    release_to: np.ndarray | None  # on commit, entries before this are released (sliding)
    need: np.ndarray  # new table entries per sequence (absent ones included)


@dataclass(slots=True, eq=False)
class GroupGrowth:
    """What a step changed in one group."""

    old_num_blocks: np.ndarray
    old_num_absent: np.ndarray | None  # (sliding groups only)
    old_stored_from: np.ndarray | None
    stored_from: np.ndarray
    release_to: np.ndarray | None
    flagged_before: set  # sequences marked maybe-shared before
    copied: list[
        tuple[Any, KVCacheBlock]
    ]  # copy-on-write: the sequence (a SeqState), its old block


@dataclass(eq=False)
class Group:
    """One KV cache group's share of the registry."""

    index: int
    window: int | None  # sliding window, None: full attention
    allocator: KVCacheAllocator
    table: BlockTable
    block_size: int
    # Sequences whose last block may have other holders: checked for copy-on-write when a step
    # writes into it.
    maybe_shared: set = field(default_factory=set)

    def plan(self, states, rows, lens, ends, safe_end) -> GroupPlan:
        """The plan of a step growing rows from `lens` to `ends` tokens (nothing changes)."""
        bs = self.block_size
        entries = self.table.num_blocks[rows]
        need = np.maximum((ends + bs - 1) // bs - entries, 0)
        if self.window is None:
            copy, sole = self._plan_copies(states, lens, ends > lens, entries, lens)
            return GroupPlan(lens, need, copy, sole, None, need)
        start = safe_end - self.window + 1  # the window of the safe end
        stored_from = np.maximum(lens, start)
        absent_new = np.clip(stored_from // bs - entries, 0, need)
        copy, sole = self._plan_copies(states, lens, stored_from < ends, entries, stored_from)
        release_to = np.maximum(start, 0) // bs
        return GroupPlan(stored_from, need - absent_new, copy, sole, release_to, need)

    def _plan_copies(self, states, lens, writes, entries, stored_from):
        """(copy, sole): which sequences copy their last block before writing into it
        (copy-on-write), and which turn out to be its only holder."""
        if not self.maybe_shared:
            return [], []
        bs = self.block_size
        sole, writers = [], {}
        for i, state in enumerate(states):
            if state not in self.maybe_shared:
                continue
            last = state.blocks[self.index].last
            if last is None or last.ref_count == 1:
                sole.append(i)
            elif writes[i] and lens[i] % bs and stored_from[i] < entries[i] * bs:
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

    def grow(self, states, rows, lens, plan: GroupPlan, cache: PagedKVCache) -> GroupGrowth:
        """Apply a plan the pool has room for; returns what an undo needs."""
        table = self.table
        sliding = self.window is not None
        grown = GroupGrowth(
            table.num_blocks[rows],
            table.num_absent[rows] if sliding else None,
            table.stored_from[rows] if sliding else None,
            plan.stored_from,
            plan.release_to,
            self.maybe_shared.intersection(states),
            [],
        )
        for i in plan.sole:
            state = states[i]
            self.maybe_shared.discard(state)
            last = state.blocks[self.index].last
            if lens[i] % self.block_size and last is not None:
                # Registered for its full contents (truncated while shared); this step
                # overwrites its tail, so it leaves the prefix index.
                self.allocator.unregister(last)
        if plan.copy:
            pairs = []
            for i, new in zip(plan.copy, self.allocator.allocate(len(plan.copy)), strict=True):
                view = states[i].blocks[self.index]
                old = view.last
                # The old block keeps this sequence's reference until the step ends: held for
                # an undo.
                view.replace_last(new)
                self.maybe_shared.discard(states[i])
                grown.copied.append((states[i], old))
                pairs.append((old.block_id, new.block_id))
            cache.copy(self.index, pairs)
        if plan.need.any():
            absent = plan.need - plan.alloc if sliding else None
            blocks = self.allocator.allocate(int(plan.alloc.sum()))
            table.append_blocks(rows, plan.need, absent, blocks)
        if sliding:  # a long step skips the new tokens before its last window
            skips = plan.stored_from > lens
            table.stored_from[rows] = np.where(skips, plan.stored_from, table.stored_from[rows])
        return grown

    def release(self, grown: GroupGrowth, rows: np.ndarray, upto: np.ndarray) -> None:
        """On commit: rows give back the blocks wholly before their window (`upto[i]`)."""
        released = self.table.release_front(rows, upto)
        self.table.stored_from[rows] = np.maximum(
            self.table.stored_from[rows], upto * self.block_size
        )
        pool = self.allocator.blocks
        self.allocator.free([pool[i] for i in released.tolist() if i >= 0])

    def undo(self, grown: GroupGrowth, states, rows, old_lens) -> None:
        """The step failed: the rows are as before it (blocks freed, copies given back)."""
        table = self.table
        pool = self.allocator.blocks
        dropped = table.cut_rows(rows, grown.old_num_blocks)
        self.allocator.free([pool[i] for i in dropped.tolist() if i >= 0])
        for state, old in grown.copied:
            view = state.blocks[self.index]
            copy = view.last
            view.replace_last(old)  # its hold becomes the sequence's again
            self.allocator.free([copy])
        table.num_tokens[rows] = old_lens
        if grown.old_num_absent is not None:
            table.num_absent[rows] = grown.old_num_absent
            table.stored_from[rows] = grown.old_stored_from
        self.maybe_shared.difference_update(states)
        self.maybe_shared.update(grown.flagged_before)
