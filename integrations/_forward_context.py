"""How pagedkv attention finds the cache of the forward pass it runs in.

transformers >= 5.24 hands `cache.update` the kwargs dict it unpacks into the attention
function, so `PagedCache.update` puts itself there under `CACHE_KWARG`. transformers 5.17 (and a
few models in later versions) call `update` without it; for those, the forward in progress is
also recorded here, the way vLLM's `set_forward_context` does, from `begin_forward` to
`end_forward`. A context variable, so each thread sees its own; it holds a weak reference, so a
forward begun and never ended (by a caller driving `PagedCache` by hand) keeps no cache alive.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import Any

__all__ = ["CACHE_KWARG", "current", "enter", "hand_over", "leave"]

# The key under which `PagedCache.update` hands itself to the attention function.
CACHE_KWARG = "pagedkv_cache"

_FORWARD: contextvars.ContextVar[weakref.ref | None] = contextvars.ContextVar(
    "pagedkv_forward", default=None
)


def enter(cache: Any) -> None:
    """`cache` runs the forward in progress in this thread."""
    _FORWARD.set(weakref.ref(cache))


def leave(cache: Any) -> None:
    """The forward of `cache` ended (a forward of another cache since then is left alone)."""
    ref = _FORWARD.get()
    if ref is not None and ref() is cache:
        _FORWARD.set(None)


def current(kwargs: dict) -> Any:
    """The cache of the forward in progress: from the attention kwargs, else this thread's."""
    cache = kwargs.get(CACHE_KWARG)
    if cache is None:
        ref = _FORWARD.get()
        cache = None if ref is None else ref()
    return cache


def hand_over(cache: Any, update_kwargs: dict) -> None:
    """In `Cache.update`: put `cache` in the kwargs transformers (>= 5.24) passes on to the
    attention function, when it handed them over (`update(..., kwargs=...)`)."""
    model_kwargs = update_kwargs.get("kwargs")
    if isinstance(model_kwargs, dict):
        model_kwargs[CACHE_KWARG] = cache
