"""The model's forward on a paged cache: one manager step, committed or aborted.

`enable_paged_attention` replaces the instance's `forward` with `paged_forward`. A forward with
a cache (given, or made here when `use_cache` is on) plans its step in `PagedCache.begin_forward`,
runs the model, and commits the step; anything raised, `KeyboardInterrupt` included, aborts it,
which leaves the cache as it was before. A forward that keeps no cache (`use_cache=False`)
runs the model's own attention: exactly stock, training included. Under `torch.compile` the
bookkeeping runs outside the graphs (see `_enter`).
"""

from __future__ import annotations

import torch

from ._hf_cache import PagedCache
from ._hf_ragged import RaggedCache
from ._hf_state import CACHE_KEYS, PagedState

__all__ = ["paged_forward"]


def paged_forward(state: PagedState, forward, *args, **kwargs):
    cache = _enter(state, kwargs, args)
    try:
        output = forward(*args, **kwargs)
    except BaseException:
        _leave(state, cache, ok=False)
        raise
    _leave(state, cache, ok=True)
    return output


# The bookkeeping around a forward is Python state (numpy tables, the manager's records): under
# torch.compile it runs as it is, outside the graphs, and the model's math between is compiled.
@torch.compiler.disable
def _enter(state: PagedState, kwargs: dict, args: tuple) -> PagedCache | RaggedCache | None:
    """Take the model's lock and open the forward: plan the step of its cache (made here when
    none is given and use_cache is on), or switch to the model's own attention (None)."""
    state.lock.acquire()
    try:
        if not state.in_generate:
            state.check_call()
        cache = _given_cache(state, kwargs)
        if isinstance(cache, RaggedCache):
            return cache  # the batching engine's packed forward: its step is planned already
        if cache is None:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(state.model_config, "use_cache", True)
            if not use_cache:
                state.use_stock_attention(True)
                return None
            cache = PagedCache(state.manager)
            kwargs[state.cache_kwarg] = cache
        _begin_forward(state, cache, args, kwargs)
        return cache
    except BaseException:
        state.lock.release()
        raise


@torch.compiler.disable
def _leave(state: PagedState, cache: PagedCache | RaggedCache | None, ok: bool) -> None:
    try:
        if cache is None:
            state.use_stock_attention(False)
        elif isinstance(cache, PagedCache):
            cache.end_forward(ok=ok)
    finally:
        state.lock.release()


def _given_cache(state: PagedState, kwargs: dict) -> PagedCache | RaggedCache | None:
    cache = next((kwargs[k] for k in CACHE_KEYS if kwargs.get(k) is not None), None)
    if cache is None:
        return None
    if not isinstance(cache, (PagedCache, RaggedCache)):
        raise TypeError(
            "this model runs pagedkv attention, which reads a PagedCache; got a "
            f"{type(cache).__name__}. Pass no cache or a PagedCache, or call "
            "disable_paged_attention(model) first."
        )
    if cache.manager is not state.manager:
        raise ValueError(
            "this PagedCache belongs to another KVCacheManager than the one "
            "enable_paged_attention gave this model: its blocks hold another model's K/V. "
            "Use PagedCache(get_manager(model))."
        )
    return cache


def _begin_forward(state: PagedState, cache: PagedCache, args: tuple, kwargs: dict) -> None:
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None and args:
        inputs = args[0]
    if inputs is None:
        raise ValueError("pagedkv needs input_ids or inputs_embeds to size the step")
    token_ids = kwargs.get("input_ids", args[0] if args else None)
    if not (isinstance(token_ids, torch.Tensor) and token_ids.ndim == 2):
        token_ids = None
    cache.begin_forward(
        kwargs.get("attention_mask"),
        inputs.shape[0],
        inputs.shape[1],
        gather=state.gather,
        input_ids=token_ids,
        position_ids=kwargs.get("position_ids"),
    )
