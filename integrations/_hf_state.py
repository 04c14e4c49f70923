"""What `enable_paged_attention` changed on one model, so `disable` can undo it exactly, and
the checks every paged call makes against what changed since."""

from __future__ import annotations

import functools
import threading
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig

from pagedkv.kvcache import KVCacheManager

from ._hf_attention import ATTN_NAME

__all__ = ["CACHE_KEYS", "MISSING", "PagedMethod", "PagedState"]

CACHE_KEYS = ("cache", "past_key_values")  # generate's and forward's cache argument, by version
MISSING = object()  # an instance attribute that was not there


@dataclass
class PagedState:
    manager: KVCacheManager
    cache_kwarg: str  # "cache" (transformers >= 5.24) or "past_key_values"
    model_config: PretrainedConfig
    # Each (sub-)config and its attention implementation before (None: transformers' default).
    saved_impls: list[tuple[PretrainedConfig, Any]]
    model_ref: weakref.ref  # the model (weakly: it holds this state)
    request: tuple[Any, dict]  # (config, overrides) as enable_paged_attention was called
    gather: bool = False  # the model's own attention reads gathered K/V (outside the registry)
    # The instance's own `forward` / `generate` attributes before, or MISSING (class methods).
    saved_attrs: dict[str, Any] = field(default_factory=dict)
    # Held by every paged forward and generate call: calls from several threads take turns.
    lock: threading.RLock = field(default_factory=threading.RLock)
    in_generate: bool = False  # a generate call holds the lock (its forwards skip the checks)
    weights: int | None = None  # fingerprint of the parameters the prefix cache was built with

    def restore_attention(self) -> None:
        for cfg, value in self.saved_impls:
            cfg._attn_implementation_internal = value

    def use_stock_attention(self, stock: bool) -> None:
        """Switch the configs to the model's own attention implementation (a forward that keeps
        no cache runs exactly as stock, autograd included), or back to pagedkv's."""
        if self.gather:  # nothing was switched: these models keep their own attention
            return
        if stock:
            self.restore_attention()
        else:
            for cfg, _ in self.saved_impls:
                cfg._attn_implementation_internal = ATTN_NAME

    def check_call(self) -> None:
        """Before a paged call: the attention is still pagedkv's, and cached prefixes were
        computed with the weights the model has now (else they are dropped)."""
        if not self.gather:
            switched = {
                type(cfg).__name__: cfg._attn_implementation
                for cfg, _ in self.saved_impls
                if cfg._attn_implementation != ATTN_NAME
            }
            if switched:
                raise ValueError(
                    f"the attention implementation was switched to {switched} after "
                    "enable_paged_attention; pagedkv would run without its attention. Call "
                    "disable_paged_attention(model) first to use another implementation."
                )
        weights = _fingerprint(self.model_ref())
        if self.weights is not None and weights != self.weights:
            self.manager.reset_prefix_cache()  # K/V computed with the old weights
        self.weights = weights

    def __reduce__(self):
        # A pickled or copied model is stock: its configs get their own implementation back.
        return (_restore_attention, (self.saved_impls,))


class PagedMethod:
    """An enabled model's `forward` or `generate`: `wrapper(state, original, ...)`.

    Pickles and deep-copies as the method it replaced, so a copy of an enabled model is a stock
    model (enable it on its own: a manager serves one model).
    """

    def __init__(self, wrapper: Callable, state: PagedState, original: Callable, saved: Any):
        functools.update_wrapper(self, original)
        self._call = functools.partial(wrapper, state, original)
        self._saved = saved

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __reduce__(self):
        original = self._call.args[1]
        if self._saved is MISSING and isinstance(original, types.MethodType):
            return (_bind, (original.__func__, original.__self__))
        return (_same, (self._saved if self._saved is not MISSING else original,))


def _fingerprint(model) -> int:
    """Changes when a parameter is replaced or modified in place (optimizer steps,
    load_state_dict): the identity and version counter of every parameter."""
    if model is None:
        return 0
    return hash(tuple((id(p), p._version) for p in model.parameters()))


def _restore_attention(saved_impls) -> None:
    for cfg, value in saved_impls:
        cfg._attn_implementation_internal = value


def _same(value):
    return value


def _bind(function: Callable, obj: Any) -> types.MethodType:
    return types.MethodType(function, obj)
