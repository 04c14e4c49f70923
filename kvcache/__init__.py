"""The KV-cache core: configuration, blocks, the block pool, device tensors, swap, manager."""

from .allocator import BlockHash, KVCacheAllocator, OutOfBlocksError
from .block import KVCacheBlock, KVCacheBlocks
from .config import DeviceType, DType, KVCacheConfig
from .manager import KVCacheManager, KVCacheStats
from .paged_cache import PagedKVCache
from .transfer import KVCacheTransfer

__all__ = [
    "BlockHash",
    "DType",
    "DeviceType",
    "KVCacheAllocator",
    "KVCacheBlock",
    "KVCacheBlocks",
    "KVCacheConfig",
    "KVCacheManager",
    "KVCacheStats",
    "KVCacheTransfer",
    "OutOfBlocksError",
    "PagedKVCache",
]
