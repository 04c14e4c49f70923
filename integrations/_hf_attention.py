"""The attention and mask functions registered with transformers under one name.

Models call `attention_interface(module, query, key, value, attention_mask, scaling=..., **kw)`.
Ours ignores `key`, `value` and `attention_mask`: `PagedCache.update` already wrote the new K/V
into the blocks, and causality, padding and sliding windows follow from the forward step's
block tables and sequence lengths. The mask function therefore returns None, which makes
transformers skip building masks altogether. How the attention finds the cache:
`_forward_context`.
"""

from __future__ import annotations

import torch

from . import _forward_context

ATTN_NAME = "pagedkv"

# Attention arguments that change the result and that the paged kernel does not implement.
_UNSUPPORTED_KWARGS = ("attention_chunk_size",)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query `[B, Hq, q, D]` -> output `[B, q, Hq, D]`."""
    cache = _forward_context.current(kwargs)
    if cache is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attention_implementation={ATTN_NAME!r} outside a "
            "forward of a model prepared with pagedkv's enable_paged_attention (no PagedCache in "
            "flight). Call that model itself, or disable_paged_attention(model) first."
        )
    if dropout and module.training:
        raise ValueError(
            "pagedkv attention is for inference; got dropout with the module in training mode"
        )
    unsupported = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if unsupported or getattr(module, "is_causal", True) is False:
        what = f"attention arguments {unsupported}" if unsupported else "non-causal attention"
        raise NotImplementedError(
            f"{type(module).__name__} needs {what}, which pagedkv's paged attention does not "
            "implement; it would compute something else"
        )
    batch, num_heads, q_len, head_dim = query.shape
    packed = query.transpose(1, 2).reshape(batch * q_len, num_heads, head_dim)
    # Attention sinks (gpt-oss passes `s_aux`): one more logit per head in each softmax.
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    out = cache.attend(
        module.layer_idx,
        packed,
        scale=head_dim**-0.5 if scaling is None else float(scaling),
        sliding_window=sliding_window or None,
        softcap=softcap or None,
        sinks=None if sinks is None else sinks.detach(),
    )
    if query.requires_grad and torch.is_grad_enabled():
        out = NoBackward.apply(packed, out)
    return out.view(batch, q_len, num_heads, head_dim), None


class AttendsThroughStep:
    """The `attend` pagedkv attention calls on the cache of the forward in flight: causal paged
    attention of packed queries `[tokens, heads, head_dim]` through that forward's manager
    `Step`, in the pool's dtype. A cache class provides `manager` and `_attending(layer_idx,
    sliding_window) -> Step`."""

    @torch.compiler.disable
    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`sinks`: a logit per head joining each softmax, as gpt-oss's `s_aux`."""
        step = self._attending(layer_idx, sliding_window)
        out = step.attend(
            layer_idx,
            query.to(self.manager.config.torch_dtype),
            scale=scale,
            causal=True,
            sliding_window=sliding_window,
            softcap=softcap,
            sinks=sinks,
        )
        return out.to(query.dtype)


class NoBackward(torch.autograd.Function):
    """`apply(source, out)`: `out` (read from the paged pool) marked as depending on `source`,
    with a backward that refuses: the pool keeps K/V values, not their autograd graph, so
    gradients would be wrong."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(
            "backward through pagedkv attention: the paged KV cache keeps K/V values, not "
            "their autograd graph, so gradients would be wrong. For training, run the forward "
            "with use_cache=False (the model's own attention runs then), or call "
            "disable_paged_attention(model)."
        )


def paged_mask(*args, **kwargs) -> None:
    """transformers mask interface: no mask; the paged kernel derives it from the cache."""
    return None


def register() -> None:
    """Register both functions under `ATTN_NAME` (idempotent; registries are keyed by name)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, paged_mask)
