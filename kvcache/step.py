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
from operator import attrgetter
from types import TracebackType

import numpy as np
import torch

from .paged_cache import PagedKVCache
from .sequences import Growth, Sequences

__all__ = ["Step"]


class Step:
    """A planned forward pass (see the module docstring). Its description is fixed:

    - `seq_ids`: the rows of the forward, in order: each planned sequence, then its forks.
    - `slot_mapping`: int64 `[num_queries]`, the slot each query's K/V is written to; -1 for
      queries that write nothing (padding, tokens held already, a fork's copy of its parent).
    - `block_tables`: int32 `[rows, width]`; entries past a row's blocks are 0 (never read).
    - `seq_lens`: int32 `[rows]`, tokens per row including this step's.
    - `query_start_loc`: int32 `[rows + 1]`, where each row's queries start in the packed
      queries; None when every row has exactly one (decode).

    Each row's queries are its last positions, ending at its length.
    """

    __slots__ = (
        "_seqs",
        "_growth",
        "_cache",
        "_state",
        "_written",
        "_seq_ids",
        "_slot_mapping",
        "_block_tables",
        "_seq_lens",
        "_query_start_loc",
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
        rows, slots, queries, new_slots = _layout(
            seqs.block_size, seqs.table.ids, growth, num_queries
        )
        cache.mark_valid(new_slots, valid)
        table = seqs.table
        device = cache.pool.device
        self._seq_ids = tuple(
            map(_SEQ_ID, growth.states)
            if not growth.children
            else (s.seq_id for st, kids in zip(growth.states, growth.children) for s in (st, *kids))
        )
        self._slot_mapping = torch.from_numpy(slots).to(device)
        self._block_tables = torch.from_numpy(table.tables(rows)).to(device)
        self._seq_lens = torch.from_numpy(table.num_tokens[rows].astype(np.int32)).to(device)
        self._query_start_loc = (
            None
            if queries is None
            else torch.from_numpy(np.concatenate(([0], np.cumsum(queries))).astype(np.int32)).to(
                device
            )
        )

    # ---- the description ------------------------------------------------------------------
    @property
    def seq_ids(self) -> tuple[Hashable, ...]:
        return self._seq_ids

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self._slot_mapping

    @property
    def block_tables(self) -> torch.Tensor:
        return self._block_tables

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
        self._cache.write(layer, key, value, self._slot_mapping)
        self._written.add(layer)

    def attend(self, layer: int, query: torch.Tensor, **kwargs) -> torch.Tensor:
        """Paged attention of the packed queries `[num_queries, num_heads, head_dim]` over one
        layer's blocks; keyword arguments are `pagedkv.kernels.paged_attention`'s (scale,
        sliding_window, softcap, causal, out)."""
        self._check_open("attend")
        return self._cache.attend(
            layer,
            query,
            self._block_tables,
            self._seq_lens,
            query_start_loc=self._query_start_loc,
            **kwargs,
        )

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V of every row, contiguous `[sum(seq_lens), heads, head_dim]`."""
        self._check_open("gather")
        return self._cache.gather(layer, self._block_tables, self._seq_lens)

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
            f"queries={self._slot_mapping.shape[0]}, seq_lens={self._seq_lens.tolist()})"
        )


_SEQ_ID = attrgetter("seq_id")


def _layout(
    block_size: int, table_ids: np.ndarray, growth: Growth, num_queries: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Block-table rows of the forward's rows, the slot of each query, queries per row (None
    when each row has one), and the slots of the new tokens, in order."""
    rows, lens, new = growth.rows, growth.old_lens, growth.num_new
    bs = block_size
    copies = None
    if growth.children:
        copies = np.fromiter((1 + len(c) for c in growth.children), np.int64, len(rows))
    if copies is None and num_queries in (None, 1) and bool((new == 1).all()):
        # Decode: one new token per row, each its row's one query.
        slots = table_ids[rows, lens // bs].astype(np.int64) * bs + lens % bs
        return rows, slots, None, slots

    seq_of, offsets = growth.row_of, growth.index
    pos = lens[seq_of] + offsets
    written = table_ids[rows[seq_of], pos // bs].astype(np.int64) * bs + pos % bs
    queries = new if num_queries is None else np.full(len(rows), num_queries, np.int64)
    if copies is None:
        out_rows, out_queries, first_out = rows, queries, np.arange(len(rows))
    else:
        child_rows = [c.blocks.row for children in growth.children for c in children]
        first_out = np.cumsum(copies) - copies  # output row of each planned sequence
        out_rows = np.empty(int(copies.sum()), np.int64)
        is_parent = np.zeros(len(out_rows), bool)
        is_parent[first_out] = True
        out_rows[is_parent] = rows
        out_rows[~is_parent] = child_rows
        out_queries = np.repeat(queries, copies)
    starts = np.cumsum(out_queries) - out_queries
    slots = np.full(int(out_queries.sum()), -1, np.int64)
    # A row's new tokens are the last of its queries.
    slots[starts[first_out[seq_of]] + (queries - new)[seq_of] + offsets] = written
    return out_rows, slots, None if bool((out_queries == 1).all()) else out_queries, written
