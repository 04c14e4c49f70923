"""One ragged forward: the new tokens of many sequences packed into one row, no padding.

The batching engine plans each forward as a manager `Step` (through `kvcache.scheduler`): some
sequences add a chunk of their prompt, others one decoded token. The model sees a batch of one
row holding every sequence's new tokens back to back, with each token's own position id;
`RaggedCache` is the `transformers.Cache` of that forward. Each layer's `update` writes the
packed K/V through the step, and pagedkv attention (`_hf_attention`) calls `attend`, which runs
`paged_attention` with the step's `query_start_loc`: each sequence's queries see only its own
blocks, so the rows never mix, and no mask is built. Only the rows that sample a token go
through the LM head (`logits_to_keep`).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from pagedkv.kvcache import KVCacheManager, Step
from pagedkv.kvcache.scheduler import ScheduledStep

from . import _forward_context
from ._hf_attention import AttendsThroughStep
from ._hf_cache import _PagedLayer

__all__ = ["RaggedCache", "ragged_forward"]


class RaggedCache(AttendsThroughStep, Cache):
    """The cache of one packed forward over `step` (see the module docstring)."""

    def __init__(self, manager: KVCacheManager, scheduled: ScheduledStep) -> None:
        super().__init__(layers=[_PagedLayer() for _ in range(manager.config.num_layers)])
        self.manager = manager
        self.step = scheduled.step
        self.num_tokens = scheduled.total_tokens

    @torch.compiler.disable
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the packed K/V `[1, kv_heads, tokens, head_dim]` of one layer."""
        cfg = self.manager.config
        expected = (1, cfg.num_kv_heads, self.num_tokens, cfg.head_dim)
        if tuple(key_states.shape) != expected:
            raise ValueError(
                f"layer {layer_idx} K/V has shape {list(key_states.shape)}; the packed forward "
                f"expects {list(expected)}"
            )
        dtype = cfg.torch_dtype
        self.step.write(
            layer_idx,
            key_states[0].transpose(0, 1).to(dtype),
            value_states[0].transpose(0, 1).to(dtype),
        )
        _forward_context.hand_over(self, kwargs)
        return key_states, value_states

    def _attending(self, layer_idx: int, sliding_window: int | None) -> Step:
        return self.step

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given per token; nothing else reads a length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False


def ragged_forward(
    model: PreTrainedModel, cache_kwarg: str, manager: KVCacheManager, scheduled: ScheduledStep
) -> torch.Tensor:
    """Run `model` over the step's packed tokens; returns the float32 logits `[sample rows,
    vocab]` of the tokens in `scheduled.logits_indices`. The step stays open (the caller
    commits or aborts it)."""
    device = model.device
    input_ids = torch.tensor([scheduled.flat_token_ids()], dtype=torch.long, device=device)
    positions = torch.tensor([scheduled.flat_positions()], dtype=torch.long, device=device)
    keep = torch.tensor(scheduled.logits_indices, dtype=torch.long, device=device)
    cache = RaggedCache(manager, scheduled)
    _forward_context.enter(cache)
    try:
        with torch.no_grad():
            out = model(
                input_ids=input_ids,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=keep,
                **{cache_kwarg: cache},
            )
    finally:
        _forward_context.leave(cache)
    written = scheduled.step.layers_written
    if len(written) != manager.config.num_layers:
        missing = sorted(set(range(manager.config.num_layers)) - written)
        raise RuntimeError(f"the packed forward did not store the K/V of layers {missing}")
    return out.logits[0].float()
