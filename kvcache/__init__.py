"""The KV-cache core: configuration, blocks, the block pool, device tensors, swap, manager,
and the continuous-batching scheduler above it."""

from .allocator import KVCacheAllocator, OutOfBlocksError
from .block import BlockHash, KVCacheBlock
from .block_table import KVCacheBlocks
from .config import DeviceType, DType, KVCacheConfig
from .manager import KVCacheManager
from .paged_cache import PagedKVCache
from .scheduler import Scheduler
from .stats import KVCacheStats
from .step import Step
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
    "Scheduler",
    "Step",
]
