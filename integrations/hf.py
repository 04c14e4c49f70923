"""transformers on pagedkv: drop-in paged attention for `model.generate`, and continuous
batching over the same models.

    manager = enable_paged_attention(model, block_size=16, num_blocks=4096)
    model.generate(input_ids, attention_mask=mask, max_new_tokens=64)   # runs on the blocks
    outs = generate_batch(model, prompts, max_new_tokens=[32, 64, 8])    # continuous batching
    disable_paged_attention(model)                                       # stock again

How a model is switched: `_hf_enable`. The streaming engine under `generate_batch`:
`_hf_engine.BatchingEngine`.
"""

from ._hf_enable import (
    disable_paged_attention,
    enable_paged_attention,
    get_manager,
    paged_attention,
)
from ._hf_engine import BatchingEngine, RequestTimings, generate_batch

__all__ = [
    "BatchingEngine",
    "RequestTimings",
    "disable_paged_attention",
    "enable_paged_attention",
    "generate_batch",
    "get_manager",
    "paged_attention",
]
