"""Drop-in paged attention for transformers `generate`.

    manager = enable_paged_attention(model, block_size=16, num_blocks=4096)
    model.generate(input_ids, attention_mask=mask, max_new_tokens=64)   # runs on the blocks
    disable_paged_attention(model)                                       # stock again

`enable_paged_attention` touches this model instance only (no class is patched):

1. registers pagedkv's attention and mask functions under one name and switches the model's
   attention implementation (and its sub-configs') to it. Models whose attention bypasses
   transformers' registry (falcon, bloom, mpt) keep their own attention, which reads K/V that
   `PagedCache.update` gathers from the blocks (`gather_kv`);
2. wraps the instance's `forward`: it finds the `PagedCache` among the arguments (or makes a
   transient one), has it plan this forward's manager step from the attention mask and input
   ids, runs the model, then commits the step, or aborts it if anything was raised (Ctrl-C
   included), which leaves the cache as it was before the forward;
3. wraps the instance's `generate`: a call without a cache (or with an empty `PagedCache`)
   gets rows that start from the longest cached prefix of their prompts (transformers computes
   only the rest); the full blocks each step fills (prompt and answer) join the prefix cache
   as the step commits. A cache made here is freed when the call ends, whether it returns or
   raises (Ctrl-C included).

A one-token probe forward at enable time checks that every layer stores its K/V in the paged
cache (and attends through pagedkv), so an unsupported model fails there, naming itself and the
reason, instead of generating wrong tokens. `disable_paged_attention` undoes all three.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from pagedkv.kvcache import KVCacheConfig, KVCacheManager, OutOfBlocksError

from ._hf_attention import ATTN_NAME, register
from ._hf_cache import PagedCache
from ._hf_padding import check_left_padded

__all__ = ["disable_paged_attention", "enable_paged_attention", "get_manager"]

_STATE_ATTR = "_pagedkv_state"
_CACHE_KEYS = ("cache", "past_key_values")
_MISSING = object()


@dataclass
class _PagedState:
    """What `enable_paged_attention` changed on one model, so `disable` can undo it exactly."""

    manager: KVCacheManager
    cache_kwarg: str  # "cache" (transformers >= 5.24) or "past_key_values"
    saved_impls: list[tuple[PretrainedConfig, Any]]
    model_config: PretrainedConfig
    gather: bool = False  # the model's own attention reads gathered K/V (outside the registry)
    # The instance's own `forward` / `generate` attributes before, or _MISSING (class methods).
    saved_attrs: dict[str, Any] = field(default_factory=dict)


def enable_paged_attention(
    model: PreTrainedModel, config: KVCacheConfig | None = None, **overrides: Any
) -> KVCacheManager:
    """Run `model`'s attention and `generate` on a paged KV cache; returns its manager.

    `config` defaults to `KVCacheConfig.from_model_config(model.config)` with the model's dtype
    and device; `overrides` are `KVCacheConfig` fields (block_size, num_blocks, ...).
    """
    if not isinstance(model, PreTrainedModel) or not hasattr(model, "generate"):
        raise TypeError(
            "enable_paged_attention needs a transformers generative model; got "
            f"{type(model).__name__}"
        )
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError(f"paged attention is already enabled on this {type(model).__name__}")
    gather = not _uses_registry(model)
    if config is None:
        defaults = {"dtype": model.dtype, "device": model.device}
        config = KVCacheConfig.from_model_config(model.config, **{**defaults, **overrides})
    elif overrides:
        config = config.replace(**overrides)
    manager = KVCacheManager(config)

    configs = _configs_of(model)
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    if not gather:
        register()
        model.set_attn_implementation(ATTN_NAME)
        missed = [type(c).__name__ for c in configs if c._attn_implementation != ATTN_NAME]
        if missed:
            _restore_impls(saved)
            raise ValueError(
                f"{type(model).__name__}: transformers did not switch {missed} to attention "
                f"implementation {ATTN_NAME!r}, so part of the model would run stock attention "
                "on an empty cache"
            )

    state = _PagedState(
        manager=manager,
        cache_kwarg=_cache_kwarg(model),
        saved_impls=saved,
        model_config=model.config,
        gather=gather,
    )
    for name, wrapper in (("forward", _paged_forward), ("generate", _paged_generate)):
        state.saved_attrs[name] = model.__dict__.get(name, _MISSING)
        original = getattr(model, name)
        setattr(model, name, functools.wraps(original)(functools.partial(wrapper, state, original)))
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
        if saved is _MISSING:
            del model.__dict__[name]
        else:
            setattr(model, name, saved)
    _restore_impls(state.saved_impls)


def get_manager(model: PreTrainedModel) -> KVCacheManager | None:
    """The manager `enable_paged_attention` gave `model`, or None."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.manager


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


def _probe(model: PreTrainedModel, state: _PagedState) -> None:
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


def _restore_impls(saved: list[tuple[PretrainedConfig, Any]]) -> None:
    for cfg, value in saved:
        cfg._attn_implementation_internal = value


def _cache_kwarg(model: PreTrainedModel) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ---- forward -------------------------------------------------------------------------------
def _paged_forward(state: _PagedState, forward, *args, **kwargs):
    """The model's forward, as one manager step of its `PagedCache` (committed if it returns,
    aborted if anything is raised)."""
    cache, transient = _forward_cache(state, kwargs)
    if cache is None:
        return forward(*args, **kwargs)  # the model's own attention needs no cache
    try:
        _begin_forward(state, cache, args, kwargs)
        output = forward(*args, **kwargs)
    except BaseException:
        cache.end_forward(ok=False)
        if transient:
            cache.free()
        raise
    cache.end_forward()
    if transient:
        cache.free()
        for key in _CACHE_KEYS:  # generate would feed it back otherwise
            if isinstance(output, dict) and output.get(key) is cache:
                output[key] = None
    return output


def _forward_cache(state: _PagedState, kwargs: dict) -> tuple[PagedCache | None, bool]:
    """The forward's cache (put into `kwargs` when made here), and whether it is transient:
    made for this forward alone (no cache given, use_cache off) and freed after it."""
    cache = next((kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
    if cache is not None:
        if not isinstance(cache, PagedCache):
            raise TypeError(
                "this model runs pagedkv attention, which reads a PagedCache; got a "
                f"{type(cache).__name__}. Pass no cache or a PagedCache, or call "
                "disable_paged_attention(model) first."
            )
        return cache, False
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(state.model_config, "use_cache", True)
    if state.gather and not use_cache:
        return None, False
    cache = PagedCache(state.manager)
    kwargs[state.cache_kwarg] = cache
    return cache, not use_cache


def _begin_forward(state: _PagedState, cache: PagedCache, args: tuple, kwargs: dict) -> None:
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


# ---- generate -------------------------------------------------------------------------------
def _paged_generate(state: _PagedState, generate, *args, **kwargs):
    user_cache = next((kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
    if user_cache is not None and not (
        isinstance(user_cache, PagedCache) and not user_cache.seq_ids
    ):
        return generate(*args, **kwargs)  # a cache in use: continue it as it is
    gen_config = kwargs.get("generation_config")
    if gen_config is None:
        gen_config = (
            getattr(getattr(generate, "__self__", None), "generation_config", None)
            or GenerationConfig()
        )
    if not kwargs.get("use_cache", gen_config.use_cache):
        return generate(*args, **kwargs)  # every forward then gets a transient cache
    implementation = kwargs.get("cache_implementation", gen_config.cache_implementation)
    if implementation is not None:
        raise ValueError(
            f"cache_implementation={implementation!r}: paged attention is enabled on this model, "
            "so generate runs on a PagedCache; drop cache_implementation or call "
            "disable_paged_attention(model) first"
        )
    input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.ndim != 2
        or input_ids.dtype not in (torch.int32, torch.int64)
        or kwargs.get("inputs_embeds") is not None
    ):
        input_ids = None  # no token ids to look up: no prefix reuse

    # The caller's (empty) PagedCache is theirs to keep; so is an assistant model's, whose
    # generate is called again and again with the cache it returned (freed when dropped). A
    # cache made here is freed when the call ends. On an error every row is freed.
    keep = user_cache is not None or bool(getattr(gen_config, "is_assistant", False))
    cache = user_cache if user_cache is not None else PagedCache(state.manager)
    for key in _CACHE_KEYS:
        kwargs.pop(key, None)
    kwargs[state.cache_kwarg] = cache
    try:
        if input_ids is not None:
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = _infer_attention_mask(input_ids, gen_config, kwargs)
                kwargs["attention_mask"] = mask
            host_ids, host_mask = input_ids.cpu(), mask.cpu().bool()
            check_left_padded(host_mask)
            prompts = [row[m].tolist() for row, m in zip(host_ids, host_mask, strict=True)]
            pads = (~host_mask).sum(1).tolist()
            cache.allocate_prompts(prompts, pads, reuse=_starts_from_cache(gen_config, kwargs))
        out = generate(*args, **kwargs)
    except OutOfBlocksError as err:
        cache.free()
        cfg = state.manager.config
        raise OutOfBlocksError(
            err.needed,
            err.free,
            err.total,
            hint=(
                f"generate needs more KV cache than the pool holds ({cfg.num_blocks} blocks of "
                f"{cfg.block_size} tokens); pass a larger num_blocks / memory_budget_bytes to "
                "enable_paged_attention, or lower the batch size, num_beams, "
                "num_return_sequences or max_new_tokens. The call's blocks were freed."
            ),
        ) from err
    except BaseException:
        cache.free()
        raise
    if not keep:
        cache.free()
    return out


def _starts_from_cache(gen_config, kwargs) -> bool:
    """Whether this generate call feeds only the columns after a pre-filled cache.

    Not so for chunked prefill on transformers 5.17 (chunks restart at column 0), nor for
    assisted decoding and prompt lookup (their first forward feeds the whole prompt).
    """

    def setting(name):
        return kwargs.get(name, getattr(gen_config, name, None))

    return all(
        setting(name) is None
        for name in (
            "prefill_chunk_size",
            "assistant_model",
            "prompt_lookup_num_tokens",
            "assistant_early_exit",
        )
    )


def _infer_attention_mask(input_ids: torch.Tensor, gen_config, kwargs) -> torch.Tensor:
    """transformers' rule: pads are `pad_token_id` tokens, unless pad is also an eos token."""
    pad = kwargs.get("pad_token_id", gen_config.pad_token_id)
    eos = kwargs.get("eos_token_id", gen_config.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if pad is None or pad in eos or not bool((input_ids == pad).any()):
        return torch.ones_like(input_ids)
    return input_ids.ne(pad).long()
