"""The CPU swap space: which CPU blocks are free, and what each swapped-out sequence left there.

The copies themselves are `KVCacheTransfer`'s (one per KV cache group); this module is the
bookkeeping around them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from .allocator import KVCacheAllocator, OutOfBlocksError
from .block import KVCacheBlock
from .block_table import KVCacheBlocks
from .paged_cache import PagedKVCache
from .transfer import KVCacheTransfer

__all__ = ["SwapSpace", "SwappedSeq"]


@dataclass(frozen=True)
class SwappedSeq:
    """A sequence parked in CPU memory."""

    cpu_blocks: tuple[tuple[int, ...], ...]  # per group: its present blocks, in order
    stored_from: tuple[int, ...]  # per group: the first position held (a sliding window's)
    num_tokens: int
    token_ids: tuple[int, ...]  # the ids known of its first positions
    extra_key: Hashable  # its prefix-cache namespace


class SwapSpace:
    """`num_cpu_blocks` CPU blocks per group (none: no swapping), their free lists, and who
    holds which."""

    def __init__(self, cache: PagedKVCache, num_cpu_blocks: int) -> None:
        groups = range(len(cache.config.groups))
        self.num_cpu_blocks = num_cpu_blocks
        self.transfers = (
            [KVCacheTransfer(cache, num_cpu_blocks, g) for g in groups] if num_cpu_blocks else None
        )
        self._free = [list(range(num_cpu_blocks - 1, -1, -1)) for _ in groups]
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
        blocks: Sequence[KVCacheBlocks],
        token_ids: Sequence[int],
        extra_key: Hashable,
    ) -> None:
        """Copy a sequence's device blocks (one `KVCacheBlocks` per group) out. Raises, and
        changes nothing, without room."""
        if self.transfers is None:
            raise ValueError(
                "swap_out needs CPU swap space; set num_cpu_blocks > 0 in KVCacheConfig"
            )
        present = [[b for b in row.block_ids if b >= 0] for row in blocks]
        for ids, free in zip(present, self._free, strict=True):
            if len(ids) > len(free):
                raise OutOfBlocksError(
                    len(ids),
                    len(free),
                    self.num_cpu_blocks,
                    hint="CPU swap space is full: raise num_cpu_blocks",
                )
        cpu = []
        for ids, free, transfer in zip(present, self._free, self.transfers, strict=True):
            cpu.append(tuple(free.pop() for _ in ids))
            transfer.swap_out(ids, cpu[-1])
        self._swapped[seq_id] = SwappedSeq(
            tuple(cpu),
            tuple(row.stored_from for row in blocks),
            blocks[0].num_tokens,
            tuple(token_ids),
            extra_key,
        )
        self.blocks_out += sum(map(len, present))

    def load(
        self, seq_id: Hashable, allocators: Sequence[KVCacheAllocator], hint: str
    ) -> tuple[list[list[KVCacheBlock]], SwappedSeq]:
        """Copy a swapped sequence into fresh device blocks of each group's allocator and
        release its CPU blocks; returns (its device blocks per group, what was parked). Raises
        `OutOfBlocksError` (with `hint`), and changes nothing, when a pool lacks room."""
        swapped = self._swapped[seq_id]
        for allocator, cpu in zip(allocators, swapped.cpu_blocks, strict=True):
            if len(cpu) > allocator.num_free_blocks:
                raise OutOfBlocksError(
                    len(cpu), allocator.num_free_blocks, allocator.num_blocks, hint=hint
                )
        del self._swapped[seq_id]
        blocks = [a.allocate(len(cpu)) for a, cpu in zip(allocators, swapped.cpu_blocks)]
        for cpu, held, free, transfer in zip(
            swapped.cpu_blocks, blocks, self._free, self.transfers, strict=True
        ):
            transfer.swap_in(cpu, [b.block_id for b in held])
            free.extend(cpu)
        self.blocks_in += sum(map(len, blocks))
        return blocks, swapped

    def discard(self, seq_id: Hashable) -> None:
        """Forget a swapped sequence (freed without coming back)."""
        for cpu, free in zip(self._swapped.pop(seq_id).cpu_blocks, self._free, strict=True):
            free.extend(cpu)

    def check_invariants(self) -> None:
        for g, free in enumerate(self._free):
            used = [b for s in self._swapped.values() for b in s.cpu_blocks[g]]
            assert len(set(used)) == len(used), "a CPU block is held by two swapped sequences"
            assert not set(used) & set(free), "a CPU block is both free and held"
            assert len(used) + len(free) == self.num_cpu_blocks
