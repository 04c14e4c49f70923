"""`generate` on a paged cache: rows that start from the longest cached prefix of their prompts.

`enable_paged_attention` replaces the instance's `generate` with `paged_generate`. A call without
a cache (or with an empty `PagedCache`) gets one row per prompt, each started from the cached
blocks of its prompt's prefix, so transformers computes only the rest; every forward then runs
as one manager step (see `_hf_forward`), whose filled blocks join the prefix cache as it
commits. A cache made here is freed when the call ends, whether it returns or raises.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from pagedkv.kvcache import OutOfBlocksError
from pagedkv.kvcache.config import CROP_STEP

from ._hf_cache import PagedCache
from ._hf_state import CACHE_KEYS, PagedState

__all__ = ["paged_generate"]


def paged_generate(state: PagedState, generate, *args, **kwargs):
    with state.lock:
        if state.in_generate:  # an assistant's generate inside a call of the same model
            return _generate(state, generate, args, kwargs)
        state.check_call()
        state.in_generate = True
        try:
            return _generate(state, generate, args, kwargs)
        finally:
            state.in_generate = False


def _generate(state: PagedState, generate, args: tuple, kwargs: dict):
    user_cache = next((kwargs[k] for k in CACHE_KEYS if kwargs.get(k) is not None), None)
    if user_cache is not None and not (
        isinstance(user_cache, PagedCache) and not user_cache.seq_ids
    ):
        return generate(*args, **kwargs)  # a cache in use: continue it as it is
    explicit = kwargs.get("generation_config")
    gen_config = explicit
    if gen_config is None:
        gen_config = (
            getattr(getattr(generate, "__self__", None), "generation_config", None)
            or GenerationConfig()
        )
    if kwargs.get("use_cache", gen_config.use_cache) is False:
        return generate(*args, **kwargs)  # no cache: every forward runs stock attention
    _check_cache_implementation(kwargs, explicit, gen_config)
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
    if _drafts(gen_config, kwargs):  # candidates are cropped, even across forwards
        cache.crop_margin = max(cache.crop_margin or 0, CROP_STEP)
    for key in CACHE_KEYS:
        kwargs.pop(key, None)
    kwargs[state.cache_kwarg] = cache
    try:
        if input_ids is not None:
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = _infer_attention_mask(input_ids, gen_config, kwargs)
                kwargs["attention_mask"] = mask
            host_ids, host_mask = input_ids.cpu(), mask.cpu().bool()
            empty = [i for i, m in enumerate(host_mask) if not bool(m.any())]
            if empty:
                raise ValueError(
                    f"prompt rows {empty} have no token (their attention_mask is all 0): stock "
                    "transformers attends over padding there, and pagedkv stores no leading "
                    "padding. Drop those rows or give each at least one token."
                )
            pads = host_mask.int().argmax(1).tolist()  # leading pads: never stored
            # A row with pads after its first token stores them (masked): its real tokens are
            # not its stored prefix, so it is not looked up.
            prompts = [
                row[p:].tolist() if bool(m[p:].all()) else None
                for row, m, p in zip(host_ids, host_mask, pads, strict=True)
            ]
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


def _check_cache_implementation(kwargs: dict, explicit, gen_config) -> None:
    """A cache implementation the caller asks for is refused (generate runs on the paged
    cache); one inherited from the checkpoint's generation config is dropped for this call."""
    asked = kwargs.get("cache_implementation")
    if asked is None and explicit is not None:
        asked = explicit.cache_implementation
    if asked is not None:
        advice = "drop cache_implementation or call disable_paged_attention(model) first"
        if asked == "static":
            advice = (
                "a static cache serves torch.compile, and paged generate is not compiled; "
                "drop cache_implementation (pagedkv sizes its own pool), or call "
                "disable_paged_attention(model) to generate compiled on a static cache"
            )
        raise ValueError(
            f"cache_implementation={asked!r}: paged attention is enabled on this model, so "
            f"generate runs on a PagedCache; {advice}"
        )
    if gen_config.cache_implementation is not None:
        kwargs["cache_implementation"] = None  # e.g. gemma2 checkpoints ship "hybrid"


_DRAFTING = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def _setting(gen_config, kwargs, name):
    return kwargs.get(name, getattr(gen_config, name, None))


def _starts_from_cache(gen_config, kwargs) -> bool:
    """Whether this generate call feeds only the columns after a pre-filled cache.

    Not so for chunked prefill on transformers 5.17 (chunks restart at column 0), nor for
    assisted decoding and prompt lookup (their first forward feeds the whole prompt).
    """
    return all(
        _setting(gen_config, kwargs, name) is None for name in ("prefill_chunk_size", *_DRAFTING)
    )


def _drafts(gen_config, kwargs) -> bool:
    """Whether this call drafts candidate tokens and crops the rejected ones: assisted
    decoding, prompt lookup, self-speculation, or an assistant model's own generate."""
    return bool(getattr(gen_config, "is_assistant", False)) or any(
        _setting(gen_config, kwargs, name) is not None for name in _DRAFTING
    )


def _infer_attention_mask(input_ids: torch.Tensor, gen_config, kwargs) -> torch.Tensor:
    """transformers' rule: pads are `pad_token_id` tokens, unless pad is also an eos token."""
    pad = kwargs.get("pad_token_id", gen_config.pad_token_id)
    eos = kwargs.get("eos_token_id", gen_config.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if pad is None or pad in eos or not bool((input_ids == pad).any()):
        return torch.ones_like(input_ids)
    return input_ids.ne(pad).long()
