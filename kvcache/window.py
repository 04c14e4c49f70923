"""Attention of a sliding-window group in a long step, whose new K/V the pool does not all hold.

A sliding group stores only what later queries can see (`sequences.py`): a step of many new
tokens (a prompt) keeps just its last window. Its own queries still need every new token, and
the window before the step: per layer, `WindowAttention` lays those out contiguously in a
scratch pool of the group's block size (the window's blocks gathered from the pool, then the
step's K/V) and runs `paged_attention` there, with the same positions, causality and window.
The scratch is as large as stock's K/V of that layer for the step, and lives only for the call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedkv.kernels import gather_kv, paged_attention, write_kv

from ._rows import ragged
from .paged_cache import PagedKVCache

if TYPE_CHECKING:  # type names only: the step module imports this one
    from .groups import Group
    from .sequences import Growth

__all__ = ["WindowAttention"]


class WindowAttention:
    """One long step of one sliding group: the scratch layout, and attention through it."""

    def __init__(
        self,
        cache: PagedKVCache,
        group: Group,
        growth: Growth,
        shape,
        valid: np.ndarray | None,
    ) -> None:
        bs = cache.config.block_size
        self._cache = cache
        self._group = group.index
        self._new_at = shape.new_at  # where each new token's K/V sits in a layer's packed K/V
        lens, new = growth.old_lens, growth.num_new
        first = np.maximum(lens - group.window + 1, 0) // bs  # the window's first block
        prefix = lens - first * bs  # tokens before the step kept for the window
        total = prefix + new
        blocks = -(-total // bs)
        base = np.cumsum(blocks) - blocks  # each sequence's scratch blocks are consecutive
        self._num_blocks = int(blocks.sum())
        device = cache.device
        # The window's blocks in the pool: a table per sequence starting at its first block.
        width = max(int((-(-prefix // bs)).max(initial=0)), 1)
        cols = first[:, None] + np.arange(width)
        held = group.table.ids[growth.rows[:, None], np.minimum(cols, group.table.ids.shape[1] - 1)]
        held = np.where(np.arange(width) < -(-prefix // bs)[:, None], held, 0)
        self._prefix_tables = torch.from_numpy(held.astype(np.int32)).to(device)
        self._prefix_lens = torch.from_numpy(prefix.astype(np.int32)).to(device)
        row_of, index = ragged(prefix)
        prefix_slots = base[row_of] * bs + index
        new_slots = base[growth.row_of] * bs + prefix[growth.row_of] + growth.index
        self._slots = torch.from_numpy(np.concatenate([prefix_slots, new_slots])).to(device)
        scratch_tables = base[:, None] + np.arange(int(blocks.max(initial=1)))
        self._tables = torch.from_numpy(scratch_tables[shape.parent_of].astype(np.int32)).to(device)
        self._lens = torch.from_numpy(total[shape.parent_of].astype(np.int32)).to(device)
        self._valid = self._validity(cache, held, prefix, valid, len(new_slots))
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _validity(self, cache, held, prefix, valid, num_new) -> torch.Tensor | None:
        """The scratch slots' validity, when a pad is among them (else None: all valid)."""
        pool_has_holes = cache.has_holes[self._group]
        if not pool_has_holes and (valid is None or bool(valid.all())):
            return None
        bs = cache.config.block_size
        device = cache.device
        out = torch.ones(self._num_blocks * bs, dtype=torch.bool, device=device)
        if pool_has_holes:
            pool_valid = cache.slot_valid[self._group]
            row_of, index = ragged(prefix)
            blocks = torch.from_numpy(held[row_of, index // bs].astype(np.int64)).to(device)
            offsets = torch.from_numpy(index % bs).to(device)
            out[self._slots[: len(row_of)]] = pool_valid[blocks, offsets]
        if valid is not None:
            out[self._slots[len(self._slots) - num_new :]] = torch.from_numpy(valid).to(device)
        return out.view(self._num_blocks, bs)

    def keep(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """A layer's K/V of the step, `[num_queries, heads, head_dim]`, for its attention."""
        self._kept[layer] = (key.detach(), value.detach())

    def attend(
        self, layer: int, query: torch.Tensor, query_start_loc: torch.Tensor | None, **kwargs
    ) -> torch.Tensor:
        key, value = self._kept.pop(layer)
        cache = self._cache
        prefix_k, prefix_v = gather_kv(
            cache.key_cache(layer), cache.value_cache(layer), self._prefix_tables, self._prefix_lens
        )
        at = torch.from_numpy(self._new_at).to(key.device)
        keys = torch.cat([prefix_k, key.index_select(0, at).to(prefix_k.dtype)])
        values = torch.cat([prefix_v, value.index_select(0, at).to(prefix_v.dtype)])
        bs = cache.config.block_size
        shape = (self._num_blocks, bs, *keys.shape[1:])
        scratch_k = keys.new_zeros(shape)
        scratch_v = values.new_zeros(shape)
        write_kv(keys, values, scratch_k, scratch_v, self._slots)
        if self._valid is not None:
            kwargs["slot_valid"] = self._valid
        return paged_attention(
            query,
            scratch_k,
            scratch_v,
            self._tables,
            self._lens,
            query_start_loc=query_start_loc,
            **kwargs,
        )
