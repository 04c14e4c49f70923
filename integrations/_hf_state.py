"""What `enable_paged_attention` changed on one model, so `disable` can undo it exactly."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig

from pagedkv.kvcache import KVCacheManager

from ._hf_attention import ATTN_NAME

__all__ = ["CACHE_KEYS", "MISSING", "PagedState"]

CACHE_KEYS = ("cache", "past_key_values")  # generate's and forward's cache argument, by version
MISSING = object()  # an instance attribute that was not there


@dataclass
class PagedState:
    manager: KVCacheManager
    cache_kwarg: str  # "cache" (transformers >= 5.24) or "past_key_values"
    model_config: PretrainedConfig
    # Each (sub-)config and its attention implementation before (None: transformers' default).
    saved_impls: list[tuple[PretrainedConfig, Any]]
    gather: bool = False  # the model's own attention reads gathered K/V (outside the registry)
    # The instance's own `forward` / `generate` attributes before, or MISSING (class methods).
    saved_attrs: dict[str, Any] = field(default_factory=dict)
    # Held by every paged forward and generate call: calls from several threads take turns.
    lock: threading.RLock = field(default_factory=threading.RLock)

    def restore_attention(self) -> None:
        for cfg, value in self.saved_impls:
            cfg._attn_implementation_internal = value

    @contextlib.contextmanager
    def stock_attention(self) -> Iterator[None]:
        """The model's own attention implementation for the duration of the block (a forward
        that keeps no cache runs exactly as stock, autograd included)."""
        if self.gather:  # nothing was switched: these models keep their own attention
            yield
            return
        self.restore_attention()
        try:
            yield
        finally:
            for cfg, _ in self.saved_impls:
                cfg._attn_implementation_internal = ATTN_NAME
