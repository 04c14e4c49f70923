"""`GroupOps`: one step's writes and attention on the layers of one KV cache group.

The step's slots, tables and lengths are the manager's own, valid by construction, and every
layer of the group uses the same ones. On the torch backend (the CPU one) what the reference
derives from them (where each token is written; which blocks each decode row gathers, in which
batch, behind which mask) is therefore worked out at the group's first layer and reused by the
others, and no launcher checks them again per layer: that host work, repeated per layer, cost
more than the attention itself on small models. The K/V and queries the model hands in are not
the manager's: any of another shape, dtype or device, and any argument the prepared path does
not take, go through the public launchers, which name what is wrong. On Triton every call goes
through the launchers (they check no values on CUDA, and take no host-side plan).
"""

from __future__ import annotations

import torch

from .paged_cache import PagedKVCache

__all__ = ["GroupOps"]

# Keyword arguments of `attend` the prepared decode path takes; any other (not None) goes to the
# launcher.
_PLANNED_KWARGS = frozenset(("scale", "causal", "sliding_window", "softcap"))


class GroupOps:
    """One step's ops on one KV cache group (see the module docstring)."""

    __slots__ = (
        "_cache",
        "_group",
        "_slot_mapping",
        "_tables",
        "_seq_lens",
        "_query_start_loc",
        "_prepared",
        "_slots",
        "_plans",
    )

    def __init__(
        self,
        cache: PagedKVCache,
        group: int,
        slot_mapping: torch.Tensor,
        tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor | None,
    ) -> None:
        self._cache = cache
        self._group = group
        self._slot_mapping = slot_mapping
        self._tables = tables
        self._seq_lens = seq_lens
        self._query_start_loc = query_start_loc
        self._prepared = cache.prepares_steps()
        self._slots = None  # where each token is written (`PagedKVCache.slot_index`), once
        self._plans: dict = {}  # (window, softcap?) -> decode plan (`PagedKVCache.plan_decode`)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store one layer's K/V `[num_queries, num_kv_heads, head_dim]` at the step's slots."""
        cache = self._cache
        rows = self._slot_mapping.shape[0]
        if self._prepared and cache.takes(key, rows) and cache.takes(value, rows):
            if self._slots is None:
                self._slots = cache.slot_index(self._slot_mapping)
            cache.write_at(layer, key, value, self._slots)
        else:
            cache.write(layer, key, value, self._slot_mapping)

    def attend(self, layer: int, query: torch.Tensor, **kwargs) -> torch.Tensor:
        """Paged attention of one layer's packed queries over the group's blocks; keyword
        arguments are `pagedkv.kernels.paged_attention`'s."""
        cache = self._cache
        if (
            self._prepared
            and self._query_start_loc is None
            and "scale" in kwargs
            and all(v is None or k in _PLANNED_KWARGS for k, v in kwargs.items())
            and cache.takes(query, self._seq_lens.shape[0], query=True)
            and _valid_window(kwargs.get("sliding_window"))
            and _valid_softcap(kwargs.get("softcap"))
        ):
            window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
            key = (window, softcap is not None)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = cache.plan_decode(
                    self._group,
                    self._tables,
                    self._seq_lens,
                    sliding_window=window,
                    softcap=softcap is not None,
                )
            return cache.attend_planned(layer, query, plan, scale=kwargs["scale"], softcap=softcap)
        return cache.attend(
            layer,
            query,
            self._tables,
            self._seq_lens,
            query_start_loc=self._query_start_loc,
            **kwargs,
        )


def _valid_window(window: object) -> bool:
    return window is None or (type(window) is int and window >= 1)


def _valid_softcap(softcap: object) -> bool:
    return softcap is None or (type(softcap) in (int, float) and softcap > 0)
