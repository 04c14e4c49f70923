"""The device tensors of the cache and the ops on them, all through `pagedkv.kernels`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pagedkv.kernels import (
    copy_blocks,
    gather_kv,
    paged_attention,
    reference,
    resolve_backend,
    write_kv,
)

from ._memory import HOST_BYTES_PER_BLOCK, available_bytes, format_bytes
from .config import KVCacheConfig

__all__ = ["PagedKVCache"]


class PagedKVCache:
    """One block-major pool per KV cache group (`config.groups`):
    `[num_blocks, group_layers, 2, block_size, num_kv_heads, head_dim]`.

    A block across its group's layers is one contiguous span, so swapping or copying a block
    moves one span. Per-layer caches are strided views `[num_blocks, block_size, num_kv_heads,
    head_dim]` of the layer's group pool, which the kernels take as they are. Ops take a
    layer, and the slot mappings and block tables of that layer's group.
    """

    def __init__(self, config: KVCacheConfig) -> None:
        self.config = config
        c = config
        _check_fits(c)
        shape = (c.block_size, c.num_kv_heads, c.head_dim)
        self.pools = [
            torch.zeros(
                (c.group_blocks(g), len(group.layers), 2, *shape),
                dtype=c.torch_dtype,
                device=c.torch_device,
            )
            for g, group in enumerate(c.groups)
        ]
        self._dtype = c.torch_dtype
        self._keys = [self.pools[g][:, i, 0] for g, i in c.layer_groups]
        self._values = [self.pools[g][:, i, 1] for g, i in c.layer_groups]
        # Whether each slot may be attended (False: a pad stored inside a padded batch); read by
        # a group's attention once some slot of it was written invalid (`has_holes`).
        self.slot_valid = [
            torch.ones((c.group_blocks(g), c.block_size), dtype=torch.bool, device=c.torch_device)
            for g in range(len(c.groups))
        ]
        self.has_holes = [False] * len(c.groups)

    @property
    def device(self) -> torch.device:
        return self.pools[0].device

    @property
    def pool(self) -> torch.Tensor:
        """The first group's pool (the only one of a model without sliding windows)."""
        return self.pools[0]

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def _check_layer(self, layer: int) -> None:
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not (0 <= layer < self.config.num_layers)
        ):
            raise ValueError(
                f"layer={layer!r} is invalid; expected an integer in 0..{self.config.num_layers - 1}"
            )

    def key_cache(self, layer: int) -> torch.Tensor:
        """`[num_blocks, block_size, num_kv_heads, head_dim]` view of one layer's keys (in its
        group's pool)."""
        self._check_layer(layer)
        return self._keys[layer]

    def value_cache(self, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        return self._values[layer]

    # ---- ops ------------------------------------------------------------------------------
    def write(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Scatter `key`/`value` `[T, num_kv_heads, head_dim]` into the slots (-1 = skip) of
        the layer's group.

        The pool keeps values, not autograd history: tensors that require grad are stored
        detached."""
        self._check_layer(layer)
        write_kv(key.detach(), value.detach(), self._keys[layer], self._values[layer], slot_mapping)

    def mark_valid(self, group: int, slots: np.ndarray, valid: np.ndarray | None) -> None:
        """Slots `slots` (int64, none -1) of a group now hold tokens that are `valid` (None:
        all)."""
        if valid is not None and not bool(valid.all()):
            self.has_holes[group] = True
        if not self.has_holes[group]:
            return  # every slot ever written is valid: nothing to record
        table = self.slot_valid[group]
        values = (
            torch.ones(len(slots), dtype=torch.bool) if valid is None else torch.from_numpy(valid)
        )
        table.view(-1)[torch.from_numpy(slots).to(table.device)] = values.to(table.device)

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        **kwargs,
    ) -> torch.Tensor:
        """Paged attention of `query` `[T, num_heads, head_dim]` over this layer's blocks.

        Keyword arguments are those of `pagedkv.kernels.paged_attention` (scale,
        query_start_loc, causal, sliding_window, softcap, sinks, out).
        """
        self._check_layer(layer)
        group = self.config.layer_groups[layer][0]
        if self.has_holes[group]:
            kwargs["slot_valid"] = self.slot_valid[group]
        return paged_attention(
            query, self._keys[layer], self._values[layer], block_tables, seq_lens, **kwargs
        )

    # ---- a step's prepared ops (torch backend; see `GroupOps`) ------------------------------
    def prepares_steps(self) -> bool:
        """Whether the ops run on the torch backend now, where a step prepares its writes and
        decode attention once for all its layers (`GroupOps`)."""
        return resolve_backend(None, self.pools[0].device) == "torch"

    def slot_index(self, slot_mapping: torch.Tensor) -> reference.SlotIndex:
        """Where `write_at` puts each token of a valid slot mapping."""
        return reference.slot_index(slot_mapping, self.config.block_size)

    def takes(self, t: object, rows: int, *, query: bool = False) -> bool:
        """Whether `t` is K or V `[rows, num_kv_heads, head_dim]` (with `query`: queries `[rows,
        heads, head_dim]`, heads a multiple of num_kv_heads) of the pool's dtype, on its
        device: what the prepared ops take as it is."""
        if not (
            isinstance(t, torch.Tensor)
            and t.dtype == self._dtype
            and t.dim() == 3
            and t.device == self.pools[0].device
        ):
            return False
        c = self.config
        num, heads, dim = t.shape
        if num != rows or dim != c.head_dim:
            return False
        return heads % c.num_kv_heads == 0 and heads > 0 if query else heads == c.num_kv_heads

    def write_at(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: reference.SlotIndex
    ) -> None:
        """`write` at slots prepared by `slot_index` from a valid slot mapping of the layer's
        group (not checked again), the K/V as `takes` accepts them."""
        self._check_layer(layer)
        reference.write_kv_at(
            key.detach(), value.detach(), self._keys[layer], self._values[layer], slots
        )

    def plan_decode(
        self,
        group: int,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        sliding_window: int | None = None,
        softcap: bool = False,
    ) -> reference.DecodePlan:
        """`reference.plan_decode` of valid tables and lengths of a group, with its slot
        validity: what `attend_planned` runs each of the group's layers through (with
        `softcap`: layers that cap their scores)."""
        first_layer = self.config.groups[group].layers[0]
        return reference.plan_decode(
            block_tables,
            seq_lens,
            self._keys[first_layer],
            sliding_window=sliding_window,
            slot_valid=self.slot_valid[group] if self.has_holes[group] else None,
            share=not softcap,
        )

    def attend_planned(
        self,
        layer: int,
        query: torch.Tensor,
        plan: reference.DecodePlan,
        *,
        scale: float,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Decode attention of one layer of the plan's group through `plan`, the queries as
        `takes` accepts them."""
        self._check_layer(layer)
        return reference.attend_decode(
            plan, query, self._keys[layer], self._values[layer], scale=scale, softcap=softcap
        )

    def gather(
        self,
        layer: int,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        num_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous K and V `[sum(seq_lens), num_kv_heads, head_dim]`, sequences packed.
        `num_tokens`: sum(seq_lens) if the caller knows it (spares a device->host sync)."""
        self._check_layer(layer)
        return gather_kv(
            self._keys[layer], self._values[layer], block_tables, seq_lens, num_tokens=num_tokens
        )

    def copy(self, group: int, block_mapping: Sequence[tuple[int, int]] | torch.Tensor) -> None:
        """Copy whole blocks of a group (its layers, K and V) from src to dst: `[(src, dst),
        ...]`."""
        mapping = torch.as_tensor(block_mapping, dtype=torch.int64).reshape(-1, 2)
        if mapping.numel() == 0:
            return
        mapping = mapping.to(self.device)
        pool = self.pools[group]  # every layer of the group, stacked: checked once, one launch
        copy_blocks(pool[:, :, 0], pool[:, :, 1], mapping)
        if self.has_holes[group]:
            valid = self.slot_valid[group]
            valid[mapping[:, 1]] = valid[mapping[:, 0]]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"PagedKVCache(blocks={c.num_blocks}, layers={c.num_layers}, groups="
            f"{[g.window for g in c.groups]}, block_size={c.block_size}, "
            f"kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, dtype={c.dtype.value}, "
            f"device={self.device}, {c.total_bytes / 2**20:.1f} MiB)"
        )


def _check_fits(config: KVCacheConfig) -> None:
    """Refuse, before allocating anything, pools their device (or the host, for the
    allocators' per-block records) has no room for."""
    host = config.total_blocks * HOST_BYTES_PER_BLOCK
    needs = [(config.torch_device, config.total_bytes + (host if config.device == "cpu" else 0))]
    if config.device != "cpu":
        needs.append((torch.device("cpu"), host))
    for device, needed in needs:
        free = available_bytes(device)
        if needed > free:
            raise ValueError(
                f"a pool of num_blocks={config.num_blocks} needs {format_bytes(needed)} on "
                f"{device} ({format_bytes(config.bytes_per_block)} per block), but "
                f"{format_bytes(free)} is free; lower num_blocks or memory_budget_bytes, or "
                "size it with memory_fraction"
            )
