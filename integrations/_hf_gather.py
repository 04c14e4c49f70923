"""Contiguous K/V for models whose attention does not go through transformers' registry.

falcon, bloom and mpt run their own attention code on the K/V that `Cache.update` returns. For
them, `PagedCache.update` returns each layer's K/V gathered from the blocks (`gather_kv`) and laid
out as stock's cache would hold them: left-padded to the width transformers sees.
"""

from __future__ import annotations

from typing import Any

import torch

from pagedkv.kvcache import KVCacheConfig

__all__ = ["padded_kv"]


def padded_kv(
    forward: Any, config: KVCacheConfig, layer_idx: int, width: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer K/V of a forward in flight as `[batch, kv_heads, width, head_dim]`, each row's
    tokens right-aligned.

    `width` is the length transformers sees (pads included), so the model's own padding mask
    lines up: its pad columns are zeros here, its real columns are the row's tokens.
    """
    window = config.layer_windows[layer_idx]
    if window is not None:
        raise NotImplementedError(
            f"layer {layer_idx} has a sliding window of {window}: its KV cache group keeps only "
            "that window, and a model whose attention reads contiguous K/V (outside "
            "transformers' attention registry) would read all of them"
        )
    step = forward.step
    if forward.gather_index is None:  # once per step, shared by all layers
        lens = step.seq_lens.to(torch.int64)
        pos = torch.arange(width, device=lens.device)
        rows = torch.arange(forward.batch, device=lens.device)[:, None] * width
        forward.gather_index = (rows + pos)[pos >= width - lens[:, None]]
    key, value = step.gather(layer_idx)
    heads, head_dim = config.num_kv_heads, config.head_dim
    padded = []
    for packed in (key, value):
        out = packed.new_zeros((forward.batch * width, heads, head_dim))
        out[forward.gather_index] = packed
        out = out.view(forward.batch, width, heads, head_dim).transpose(1, 2)
        padded.append(out.to(dtype))
    return padded[0], padded[1]
