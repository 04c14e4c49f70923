"""The CPU swap space: which CPU blocks are free, and what each swapped-out sequence left there.

The copies themselves are `KVCacheTransfer`'s; this module is the bookkeeping around them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from .allocator import OutOfBlocksError
from .block_table import KVCacheBlocks
from .paged_cache import PagedKVCache
from .transfer import KVCacheTransfer

__all__ = ["SwapSpace", "SwappedSeq"]


@dataclass(frozen=True)
class SwappedSeq:
    """A sequence parked in CPU memory."""

    cpu_blocks: tuple[int, ...]  # its blocks, in order
    num_tokens: int
    token_ids: tuple[int, ...]  # the ids known of its first positions
    extra_key: Hashable  # its prefix-cache namespace


class SwapSpace:
    """`num_cpu_blocks` CPU blocks (none: no swapping), their free list, and who holds which."""

    def __init__(self, cache: PagedKVCache, num_cpu_blocks: int) -> None:
        self.num_cpu_blocks = num_cpu_blocks
        self.transfer = KVCacheTransfer(cache, num_cpu_blocks) if num_cpu_blocks else None
        self._free = list(range(num_cpu_blocks - 1, -1, -1))
        self._swapped: dict[Hashable, SwappedSeq] = {}
        self.blocks_out = 0  # device blocks copied out, since creation
        self.blocks_in = 0

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._swapped

    def __len__(self) -> int:
        return len(self._swapped)

    def ids(self) -> list[Hashable]:
        return list(self._swapped)

    def get(self, seq_id: Hashable) -> SwappedSeq:
        return self._swapped[seq_id]

    def store(
        self,
        seq_id: Hashable,
        blocks: KVCacheBlocks,
        token_ids: Sequence[int],
        extra_key: Hashable,
    ) -> None:
        """Copy a sequence's device blocks out. Raises (and changes nothing) without room."""
        device_blocks = blocks.block_ids
        if self.transfer is None:
            raise ValueError(
                "swap_out needs CPU swap space; set num_cpu_blocks > 0 in KVCacheConfig"
            )
        n = len(device_blocks)
        if n > len(self._free):
            raise OutOfBlocksError(
                n,
                len(self._free),
                self.num_cpu_blocks,
                hint="CPU swap space is full: raise num_cpu_blocks",
            )
        cpu = [self._free.pop() for _ in range(n)]
        self.transfer.swap_out(device_blocks, cpu)
        self._swapped[seq_id] = SwappedSeq(
            tuple(cpu), blocks.num_tokens, tuple(token_ids), extra_key
        )
        self.blocks_out += n

    def load(self, seq_id: Hashable, device_blocks: Sequence[int]) -> SwappedSeq:
        """Copy a swapped sequence into `device_blocks` and release its CPU blocks."""
        swapped = self._swapped.pop(seq_id)
        self.transfer.swap_in(swapped.cpu_blocks, device_blocks)
        self._free.extend(swapped.cpu_blocks)
        self.blocks_in += len(device_blocks)
        return swapped

    def discard(self, seq_id: Hashable) -> None:
        """Forget a swapped sequence (freed without coming back)."""
        self._free.extend(self._swapped.pop(seq_id).cpu_blocks)

    def check_invariants(self) -> None:
        used = [b for s in self._swapped.values() for b in s.cpu_blocks]
        assert len(set(used)) == len(used), "a CPU block is held by two swapped sequences"
        assert not set(used) & set(self._free), "a CPU block is both free and held"
        assert len(used) + len(self._free) == self.num_cpu_blocks
