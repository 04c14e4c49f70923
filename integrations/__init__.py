"""transformers integration: paged attention behind `model.generate`."""

from ._hf_attention import ATTN_NAME
from ._hf_cache import PagedCache
from .hf import disable_paged_attention, enable_paged_attention, get_manager

__all__ = [
    "ATTN_NAME",
    "PagedCache",
    "disable_paged_attention",
    "enable_paged_attention",
    "get_manager",
]
