"""transformers integration: paged attention behind `model.generate`, and continuous batching
(`generate_batch`, `BatchingEngine`) on the same paged cache.

    from pagedkv.integrations import enable_paged_attention, disable_paged_attention

    manager = enable_paged_attention(model, block_size=16, num_blocks=4096)
    out = model.generate(**inputs, max_new_tokens=64)   # on the paged cache; prefixes reused
    manager.stats, manager.used_bytes                    # hits, CoW copies; KV bytes held
    disable_paged_attention(model)                       # stock attention and generate again

For a cache that outlives one call, pass `PagedCache(manager)` yourself (`cache=` on
transformers >= 5.24, `past_key_values=` on 5.17) and `free()` it when done.
"""

from ._hf_attention import ATTN_NAME
from ._hf_cache import PagedCache
from .hf import (
    BatchingEngine,
    RequestTimings,
    disable_paged_attention,
    enable_paged_attention,
    generate_batch,
    get_manager,
    paged_attention,
)

__all__ = [
    "ATTN_NAME",
    "BatchingEngine",
    "PagedCache",
    "RequestTimings",
    "disable_paged_attention",
    "enable_paged_attention",
    "generate_batch",
    "get_manager",
    "paged_attention",
]
