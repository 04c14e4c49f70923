"""Switching a model to paged attention and back: `enable_paged_attention` and its inverse.

    manager = enable_paged_attention(model, block_size=16, num_blocks=4096)
    model.generate(input_ids, attention_mask=mask, max_new_tokens=64)   # runs on the blocks
    disable_paged_attention(model)                                       # stock again

`enable_paged_attention` touches this model instance only (no class is patched):

1. registers pagedkv's attention and mask functions under one name and switches the model's
   attention implementation (and its sub-configs') to it. Models whose attention bypasses
   transformers' registry (falcon, bloom, mpt) keep their own attention, which reads K/V that
   `PagedCache.update` gathers from the blocks (`gather_kv`);
2. wraps the instance's `forward` (`_hf_forward`): each forward with a cache is one manager
   step, committed when it returns and aborted, leaving the cache as before, if anything is
   raised (Ctrl-C included); a forward without a cache runs the model's own attention;
3. wraps the instance's `generate` (`_hf_generate`): a call's rows start from the longest
   cached prefix of their prompts, and the blocks each step fills join the prefix cache.

Calls from several threads take turns (one lock per model).

A one-token probe forward at enable time checks that every layer stores its K/V in the paged
cache (and attends through pagedkv), so an unsupported model fails there, naming itself and the
reason, instead of generating wrong tokens. `disable_paged_attention` undoes all three.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from pagedkv.kvcache import KVCacheConfig, KVCacheManager

from ._hf_attention import ATTN_NAME, register
from ._hf_cache import PagedCache
from ._hf_forward import paged_forward
from ._hf_generate import paged_generate
from ._hf_state import MISSING, PagedMethod, PagedState

__all__ = [
    "disable_paged_attention",
    "enable_paged_attention",
    "enable_on",
    "get_manager",
    "paged_attention",
    "state_of",
]

_STATE_ATTR = "_pagedkv_state"


def enable_paged_attention(
    model: PreTrainedModel, config: KVCacheConfig | None = None, **overrides: Any
) -> KVCacheManager:
    """Run `model`'s attention and `generate` on a paged KV cache; returns its manager.

    `config` defaults to `KVCacheConfig.from_model_config(model.config)` with the model's dtype
    and device; `overrides` are `KVCacheConfig` fields (block_size, num_blocks, ...). On a model
    already enabled with the same settings (a notebook cell run again) it returns the existing
    manager; other settings need `disable_paged_attention(model)` first.
    """
    if not isinstance(model, PreTrainedModel) or not hasattr(model, "generate"):
        raise TypeError(
            "enable_paged_attention needs a transformers generative model; got "
            f"{type(model).__name__}"
        )
    request = (config, overrides)
    current = model.__dict__.get(_STATE_ATTR)
    if current is not None:
        if current.request == request:
            return current.manager
        raise ValueError(
            f"paged attention is already enabled on this {type(model).__name__} with "
            f"{_describe(current.request)}; to enable it with {_describe(request)}, call "
            "disable_paged_attention(model) first"
        )
    return enable_on(model, config, overrides)


def enable_on(
    model: PreTrainedModel,
    config: KVCacheConfig | None,
    overrides: dict,
    manager: KVCacheManager | None = None,
) -> KVCacheManager:
    """`enable_paged_attention` (no checks of an earlier enable), or with `manager` given,
    on that manager: its geometry must be the model's."""
    request = (config, overrides) if manager is None else (manager.config, {"manager": id(manager)})
    if manager is not None:
        config = manager.config
    elif config is None:
        defaults = {"dtype": model.dtype, "device": model.device}
        config = KVCacheConfig.from_model_config(model.config, **{**defaults, **overrides})
    elif overrides:
        config = config.replace(**overrides)
    gather = not _uses_registry(model)
    if manager is None:
        manager = KVCacheManager(config)
    else:
        _check_geometry(model, config)

    configs = _configs_of(model)
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    if not gather:
        register()
        model.set_attn_implementation(ATTN_NAME)
        missed = [type(c).__name__ for c in configs if c._attn_implementation != ATTN_NAME]
        if missed:
            for cfg, value in saved:
                cfg._attn_implementation_internal = value
            raise ValueError(
                f"{type(model).__name__}: transformers did not switch {missed} to attention "
                f"implementation {ATTN_NAME!r}, so part of the model would run stock attention "
                "on an empty cache"
            )

    state = PagedState(
        manager=manager,
        cache_kwarg=_cache_kwarg(model),
        model_config=model.config,
        saved_impls=saved,
        model_ref=weakref.ref(model),
        request=request,
        gather=gather,
    )
    for name, wrapper in (("forward", paged_forward), ("generate", paged_generate)):
        saved_attr = state.saved_attrs[name] = model.__dict__.get(name, MISSING)
        setattr(model, name, PagedMethod(wrapper, state, getattr(model, name), saved_attr))
    setattr(model, _STATE_ATTR, state)
    try:
        _probe(model, state)
    except BaseException:
        disable_paged_attention(model)
        raise
    return manager


def disable_paged_attention(model: PreTrainedModel) -> None:
    """Undo `enable_paged_attention`: stock attention and `generate` again."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        raise ValueError(f"paged attention is not enabled on this {type(model).__name__}")
    for name, saved in state.saved_attrs.items():
        if saved is MISSING:
            del model.__dict__[name]
        else:
            setattr(model, name, saved)
    state.restore_attention()


def state_of(model: PreTrainedModel) -> PagedState:
    """What enabling changed on `model` (it must be enabled)."""
    return model.__dict__[_STATE_ATTR]


def _check_geometry(model: PreTrainedModel, config: KVCacheConfig) -> None:
    """A manager made elsewhere must hold this model's layers, heads and windows."""
    wanted = KVCacheConfig.from_model_config(model.config, num_blocks=1)
    fields = ("num_layers", "num_kv_heads", "head_dim", "layer_windows")
    differ = {f: (getattr(config, f), getattr(wanted, f)) for f in fields}
    differ = {f: v for f, v in differ.items() if v[0] != v[1]}
    if differ:
        raise ValueError(
            f"the manager's KV cache does not fit {type(model).__name__}: "
            + ", ".join(
                f"{f}={have!r} (the model needs {need!r})" for f, (have, need) in differ.items()
            )
        )


def get_manager(model: PreTrainedModel) -> KVCacheManager | None:
    """The manager `enable_paged_attention` gave `model`, or None."""
    state = model.__dict__.get(_STATE_ATTR)
    return None if state is None else state.manager


@contextlib.contextmanager
def paged_attention(
    model: PreTrainedModel, config: KVCacheConfig | None = None, **overrides: Any
) -> Iterator[KVCacheManager]:
    """`with paged_attention(model, block_size=16) as manager:` paged inside the block, and
    stock again after it (unless paged attention was enabled before the block)."""
    enabled_before = get_manager(model) is not None
    manager = enable_paged_attention(model, config, **overrides)
    try:
        yield manager
    finally:
        if not enabled_before:
            disable_paged_attention(model)


# ---- checks ---------------------------------------------------------------------------------
def _uses_registry(model: PreTrainedModel) -> bool:
    """Whether every sub-model's attention goes through transformers' AttentionInterface.

    transformers' own test (`_can_set_attn_implementation`: the modeling file calls
    `ALL_ATTENTION_FUNCTIONS.get_interface`). falcon, bloom, mpt (and gptj on 5.17) do not:
    their attention code reads K/V from `cache.update`, which then gathers them.
    """
    if model.config.is_encoder_decoder:
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; pagedkv serves decoder-only models"
        )
    return all(
        m._can_set_attn_implementation() for m in model.modules() if isinstance(m, PreTrainedModel)
    )


def _probe(model: PreTrainedModel, state: PagedState) -> None:
    """One-token forward: every layer must store its K/V here and (registry models) attend here.

    A model that keeps K/V elsewhere, shares them across layers or calls its own attention
    would otherwise generate silently wrong tokens.
    """
    cache = PagedCache(state.manager)
    token = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    try:
        with torch.no_grad():
            model(input_ids=token, use_cache=True, **{state.cache_kwarg: cache})
        forward = cache.last_forward
    except NotImplementedError as err:
        raise ValueError(
            f"{type(model).__name__} ({model.config.model_type}) cannot run on pagedkv: {err}"
        ) from err
    finally:
        cache.free()
    layers = set(range(state.manager.config.num_layers))
    problems = []
    if forward is None:
        problems.append("its forward did not run through pagedkv")
    else:
        written = set(forward.step.layers_written)
        if written != layers:
            problems.append(f"layers {sorted(layers - written)} did not store K/V in the cache")
        if not state.gather and set(forward.attended) != layers:
            problems.append(
                f"layers {sorted(layers - set(forward.attended))} did not call pagedkv attention"
            )
        elif not state.gather:
            unwindowed = [i for i in _sliding_layers(model) if not forward.attended.get(i)]
            if unwindowed:
                problems.append(
                    f"layers {unwindowed} have a sliding window in the config but do not pass "
                    "it to the attention function (transformers would apply it in the mask)"
                )
    if problems:
        raise ValueError(
            f"{type(model).__name__} ({model.config.model_type}) cannot run on pagedkv: "
            + "; ".join(problems)
            + ". Generating with it would be silently wrong."
        )


def _sliding_layers(model: PreTrainedModel) -> list[int]:
    """Layers whose config says they attend through a sliding (or chunked) window."""
    cfg = model.config.get_text_config()
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        windowed = ("sliding_attention", "chunked_attention")
        return [i for i, kind in enumerate(layer_types) if kind in windowed]
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return list(range(cfg.num_hidden_layers))
    return []


def _configs_of(model: PreTrainedModel) -> list[PretrainedConfig]:
    seen: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PretrainedConfig):
            seen.setdefault(id(cfg), cfg)
            for key in getattr(cfg, "sub_configs", {}):
                sub = getattr(cfg, key, None)
                if isinstance(sub, PretrainedConfig):
                    seen.setdefault(id(sub), sub)
    return list(seen.values())


def _describe(request: tuple[KVCacheConfig | None, dict]) -> str:
    config, overrides = request
    parts = [repr(config)] if config is not None else []
    parts += [f"{k}={v!r}" for k, v in overrides.items()]
    return ", ".join(parts) or "the default settings"


def _cache_kwarg(model: PreTrainedModel) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
