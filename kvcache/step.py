"""`Step`: one forward pass over some sequences, planned all or nothing, then committed or aborted.

`KVCacheManager.step` reserves the slots of the new tokens (copying shared last blocks on
write, forking sequences for beams) and describes the forward once, on the pool's device: slot
mapping, block tables, sequence lengths and query start offsets. The forward writes each
layer's K/V and attends through the step. If it succeeds the step commits: the full blocks it
filled join the prefix cache. If anything is raised, `KeyboardInterrupt` included, it aborts:
every sequence is back to what it was, and nothing unwritten was ever registered.

    with manager.step(["a", "b"], 1, token_ids=[[5], [9]]) as step:
        for layer in range(num_layers):
            step.write(layer, k[layer], v[layer])
            out = step.attend(layer, q[layer], scale=head_dim**-0.5)
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from operator import attrgetter
from types import TracebackType

import numpy as np
import torch

from .group_ops import GroupOps
from .groups import GroupGrowth
from .paged_cache import PagedKVCache
from .sequences import Growth, Sequences
from .window import WindowAttention

__all__ = ["Step"]


class Step:
    """A planned forward pass (see the module docstring). Its description is fixed:

    - `seq_ids`: the rows of the forward, in order: each planned sequence, then its forks.
    - `slot_mappings[g]`: int64 `[num_queries]`, the slot of KV cache group g each query's
      K/V is written to; -1 for queries that write nothing (padding, tokens held already, a
      fork's copy of its parent, a token a sliding window will not need).
    - `tables[g]`: int32 `[rows, width]` block tables of group g; entries past a row's blocks
      are 0, entries a sliding window released are -1 (neither is read).
    - `seq_lens`: int32 `[rows]`, tokens per row including this step's.
    - `query_start_loc`: int32 `[rows + 1]`, where each row's queries start in the packed
      queries; None when every row has exactly one (decode).
    - `slot_mapping`, `block_tables`: those of the first group (the only one without sliding
      windows).

    Each row's queries are its last positions, ending at its length. `write` and `attend`
    pick the layer's group.
    """

    __slots__ = (
        "_seqs",
        "_growth",
        "_cache",
        "_state",
        "_written",
        "_seq_ids",
        "_slot_mappings",
        "_tables",
        "_seq_lens",
        "_num_keys",
        "_query_start_loc",
        "_windows",
        "_ops",
    )

    def __init__(
        self,
        seqs: Sequences,
        growth: Growth,
        cache: PagedKVCache,
        num_queries: int | None,
        valid: np.ndarray | None = None,
    ) -> None:
        self._seqs = seqs
        self._growth = growth
        self._cache = cache
        self._state = "open"
        self._written: set[int] = set()
        device = cache.device
        shape = _Shape.of(growth, num_queries)
        self._slot_mappings = []
        self._tables = []
        self._windows: list[WindowAttention | None] = []
        for group, grown in zip(seqs.groups, growth.groups, strict=True):
            slots, new_slots, stored = _slots(
                seqs.block_size, group.table.ids, growth, grown, shape
            )
            kept = valid if valid is None or stored is None else valid[stored]
            cache.mark_valid(group.index, new_slots, kept)
            self._slot_mappings.append(torch.from_numpy(slots).to(device))
            table = group.table.tables(shape.rows)
            if group.window is not None and shape.padded:
                table = _cover_absent(table)
            self._tables.append(torch.from_numpy(table).to(device))
            long = group.window is not None and bool((grown.stored_from > growth.old_lens).any())
            self._windows.append(
                WindowAttention(cache, group, growth, shape, valid) if long else None
            )
        self._seq_ids = tuple(
            map(_SEQ_ID, growth.states)
            if not growth.children
            else (s.seq_id for st, kids in zip(growth.states, growth.children) for s in (st, *kids))
        )
        lengths = seqs.lengths[shape.rows]
        self._seq_lens = torch.from_numpy(lengths.astype(np.int32)).to(device)
        self._num_keys = int(lengths.sum())  # known on the host: a gather needs no device sync
        self._query_start_loc = (
            None
            if shape.queries is None
            else torch.from_numpy(
                np.concatenate(([0], np.cumsum(shape.queries))).astype(np.int32)
            ).to(device)
        )
        self._ops = [
            GroupOps(cache, g, slots, table, self._seq_lens, self._query_start_loc)
            for g, (slots, table) in enumerate(zip(self._slot_mappings, self._tables, strict=True))
        ]

    # ---- the description ------------------------------------------------------------------
    @property
    def seq_ids(self) -> tuple[Hashable, ...]:
        return self._seq_ids

    @property
    def slot_mappings(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._slot_mappings)

    @property
    def tables(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._tables)

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self._slot_mappings[0]

    @property
    def block_tables(self) -> torch.Tensor:
        return self._tables[0]

    @property
    def seq_lens(self) -> torch.Tensor:
        return self._seq_lens

    @property
    def query_start_loc(self) -> torch.Tensor | None:
        return self._query_start_loc

    @property
    def state(self) -> str:
        """ "open", "committed" or "aborted"."""
        return self._state

    @property
    def layers_written(self) -> frozenset[int]:
        """Layers whose K/V this step wrote through `write`."""
        return frozenset(self._written)

    # ---- the forward ----------------------------------------------------------------------
    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store this step's K/V `[num_queries, num_kv_heads, head_dim]` of one layer."""
        self._check_open("write")
        group = self._cache.config.layer_groups[layer][0]
        self._ops[group].write(layer, key, value)
        if self._windows[group] is not None:
            self._windows[group].keep(layer, key, value)
        self._written.add(layer)

    def attend(self, layer: int, query: torch.Tensor, **kwargs) -> torch.Tensor:
        """Paged attention of the packed queries `[num_queries, num_heads, head_dim]` over one
        layer's blocks; keyword arguments are `pagedkv.kernels.paged_attention`'s (scale,
        sliding_window, softcap, sinks, causal, out). A layer of a sliding-window group attends
        through its window (`sliding_window` may be left out; another value is refused)."""
        self._check_open("attend")
        group = self._cache.config.layer_groups[layer][0]
        window = self._seqs.groups[group].window
        if window is not None:  # the layer's group keeps only this window: attend through it
            asked = kwargs.get("sliding_window")
            if asked is not None and asked != window:
                raise ValueError(
                    f"layer {layer} is in a KV cache group with sliding window {window} (see "
                    f"KVCacheConfig.layer_windows); got sliding_window={asked!r}"
                )
            kwargs["sliding_window"] = window
        if self._windows[group] is not None:  # a long step: its K/V are not all in the pool
            return self._windows[group].attend(layer, query, self._query_start_loc, **kwargs)
        return self._ops[group].attend(layer, query, **kwargs)

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V of every row, contiguous `[sum(seq_lens), heads, head_dim]`
        (a full-attention layer: a sliding one holds only its window)."""
        self._check_open("gather")
        group = self._cache.config.layer_groups[layer][0]
        return self._cache.gather(
            layer, self._tables[group], self._seq_lens, num_tokens=self._num_keys
        )

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            raise RuntimeError(f"cannot {what} through a step that is {self._state}")

    # ---- the transaction ------------------------------------------------------------------
    def commit(self) -> None:
        """The forward succeeded: keep what the step reserved, register the blocks it filled."""
        self._close("commit")
        self._seqs.commit(self._growth)
        self._state = "committed"

    def abort(self) -> None:
        """The forward failed: undo everything the step reserved. Aborting twice is a no-op."""
        if self._state == "aborted":
            return
        self._close("abort")
        self._seqs.undo(self._growth)
        self._state = "aborted"

    def _close(self, what: str) -> None:
        if self._state != "open":
            raise RuntimeError(f"cannot {what} a step that is {self._state}")

    def __enter__(self) -> Step:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "open":
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __repr__(self) -> str:
        return (
            f"Step({self._state}, rows={len(self._seq_ids)}, "
            f"queries={self._slot_mappings[0].shape[0]}, seq_lens={self._seq_lens.tolist()})"
        )


_SEQ_ID = attrgetter("seq_id")


@dataclass(frozen=True)
class _Shape:
    """How the forward's rows and queries are laid out (the same in every group)."""

    rows: np.ndarray  # table row of each forward row: each planned sequence, then its forks
    queries: np.ndarray | None  # queries per forward row; None: one each (decode)
    new_at: np.ndarray | None  # index in the packed queries of each new token; None: decode
    parent_of: np.ndarray  # the planned sequence of each forward row
    padded: bool = False  # some row has queries before its new tokens (a padded batch)

    @classmethod
    def of(cls, growth: Growth, num_queries: int | None) -> _Shape:
        rows, new = growth.rows, growth.num_new
        index = np.arange(len(rows))
        if not growth.children and num_queries in (None, 1) and bool((new == 1).all()):
            return cls(rows, None, None, index)  # decode: one new token per row, one query
        queries = new if num_queries is None else np.full(len(rows), num_queries, np.int64)
        if not growth.children:
            out_rows, out_queries, first_out, parent_of = rows, queries, index, index
        else:
            copies = np.fromiter((1 + len(c) for c in growth.children), np.int64, len(rows))
            first_out = np.cumsum(copies) - copies  # forward row of each planned sequence
            parent_of = np.repeat(index, copies)
            out_rows = np.empty(int(copies.sum()), np.int64)
            is_parent = np.zeros(len(out_rows), bool)
            is_parent[first_out] = True
            out_rows[is_parent] = rows
            out_rows[~is_parent] = growth.child_rows()
            out_queries = np.repeat(queries, copies)
        starts = np.cumsum(out_queries) - out_queries
        seq_of = growth.row_of
        # A row's new tokens are the last of its queries.
        new_at = starts[first_out[seq_of]] + (queries - new)[seq_of] + growth.index
        single = bool((out_queries == 1).all())
        padded = bool((queries > new).any())
        return cls(out_rows, None if single else out_queries, new_at, parent_of, padded)

    @property
    def num_queries(self) -> int:
        return len(self.rows) if self.queries is None else int(self.queries.sum())


def _cover_absent(table: np.ndarray) -> np.ndarray:
    """A sliding group's tables for a padded batch: a pad query before a row's new tokens may
    look back past the window its row holds, so each ABSENT entry names the row's first held
    block instead (the pad's output is discarded; it reads only its own row's blocks)."""
    absent = table < 0
    if not absent.any():
        return table
    first = np.take_along_axis(table, np.argmax(~absent, axis=1)[:, None], axis=1)
    return np.where(absent, np.maximum(first, 0), table)


def _slots(
    block_size: int, table_ids: np.ndarray, growth: Growth, grown: GroupGrowth, shape: _Shape
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In one group: the slot of each query (-1: writes nothing), the slots of the new tokens
    it stores, in order, and which new tokens those are (a mask; None: all)."""
    bs = block_size
    rows, lens = growth.rows, growth.old_lens
    if shape.new_at is None:
        slots = table_ids[rows, lens // bs].astype(np.int64) * bs + lens % bs
        return slots, slots, None
    seq_of = growth.row_of
    pos = lens[seq_of] + growth.index
    stored = pos >= grown.stored_from[seq_of]
    written = table_ids[rows[seq_of], pos // bs].astype(np.int64) * bs + pos % bs
    slots = np.full(shape.num_queries, -1, np.int64)
    slots[shape.new_at[stored]] = written[stored]
    return slots, written[stored], stored
