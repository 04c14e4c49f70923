"""Swap blocks between the device pool and a CPU pool."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .paged_cache import PagedKVCache

__all__ = ["KVCacheTransfer"]


class KVCacheTransfer:
    """A CPU pool of `num_cpu_blocks` blocks (pinned once, up front, when CUDA is present) and
    batched copies between it and one group's pool of a `PagedKVCache`.

    The pool is block-major, so each block is one contiguous span on both sides and a batch of
    blocks moves with one gather and one scatter. On CUDA, copies run on a side stream; the
    device pool's stream waits for a swap-in before anything reads the blocks, and a swap-out
    is complete when `swap_out` returns (the CPU data is needed right away by nothing, but the
    device blocks are reused immediately). On a CPU-only machine the same code path runs CPU ->
    CPU.
    """

    def __init__(self, cache: PagedKVCache, num_cpu_blocks: int, group: int = 0) -> None:
        if num_cpu_blocks < 1:
            raise ValueError(f"num_cpu_blocks={num_cpu_blocks} is invalid; expected >= 1 to swap")
        self.cache = cache
        self.num_cpu_blocks = num_cpu_blocks
        self._pool = cache.pools[group]  # this group's device pool and slot validity
        self._valid = cache.slot_valid[group]
        pin = self._pool.is_cuda and torch.cuda.is_available()
        self.cpu_pool = torch.zeros(
            (num_cpu_blocks, *self._pool.shape[1:]), dtype=self._pool.dtype, pin_memory=pin
        )
        # The slots' validity travels with the blocks (a byte per token).
        self.cpu_valid = torch.ones(
            (num_cpu_blocks, cache.config.block_size), dtype=torch.bool, pin_memory=pin
        )
        self._stream = torch.cuda.Stream(self._pool.device) if self._pool.is_cuda else None

    def _index(self, ids: Sequence[int], device: torch.device) -> torch.Tensor:
        return torch.as_tensor(list(ids), dtype=torch.int64, device=device)

    def swap_out(self, device_blocks: Sequence[int], cpu_blocks: Sequence[int]) -> None:
        """Copy device blocks to CPU blocks, pairwise. Complete when it returns: the device
        blocks are reused right away."""
        self._check(device_blocks, cpu_blocks)
        self._copy(self._pool, device_blocks, self.cpu_pool, cpu_blocks)
        self._copy(self._valid, device_blocks, self.cpu_valid, cpu_blocks)
        if self._stream is not None:
            self._stream.synchronize()

    def swap_in(self, cpu_blocks: Sequence[int], device_blocks: Sequence[int]) -> None:
        """Copy CPU blocks to device blocks, pairwise. The device's current stream waits for
        the copies before anything it runs later reads the blocks."""
        self._check(device_blocks, cpu_blocks)
        self._copy(self.cpu_pool, cpu_blocks, self._pool, device_blocks)
        self._copy(self.cpu_valid, cpu_blocks, self._valid, device_blocks)
        if self._stream is not None:
            torch.cuda.current_stream(self._pool.device).wait_stream(self._stream)

    def _copy(
        self, src: torch.Tensor, src_ids: Sequence[int], dst: torch.Tensor, dst_ids: Sequence[int]
    ) -> None:
        if not src_ids:
            return
        if self._stream is None:  # CPU -> CPU: one gather and one scatter
            index = self._index(src_ids, src.device)
            dst.index_copy_(0, self._index(dst_ids, dst.device), src.index_select(0, index))
            return
        # One contiguous span per block, straight between pinned and device memory.
        self._stream.wait_stream(torch.cuda.current_stream(self._pool.device))
        with torch.cuda.stream(self._stream):
            for s, d in zip(src_ids, dst_ids):
                dst[d].copy_(src[s], non_blocking=True)

    def _check(self, device_blocks: Sequence[int], cpu_blocks: Sequence[int]) -> None:
        if len(device_blocks) != len(cpu_blocks):
            raise ValueError(
                f"swap needs as many CPU blocks as device blocks; got {len(cpu_blocks)} and "
                f"{len(device_blocks)}"
            )
        num_device = self._pool.shape[0]
        bad = [b for b in device_blocks if not 0 <= b < num_device]
        if bad:
            raise ValueError(f"device block ids {bad} out of range 0..{num_device - 1}")
        bad = [b for b in cpu_blocks if not 0 <= b < self.num_cpu_blocks]
        if bad:
            raise ValueError(f"CPU block ids {bad} out of range 0..{self.num_cpu_blocks - 1}")
