"""How much memory a device has free, and the default size of a pool on it.

The default, when a config names no size, is memory-aware: on CUDA half the device memory
free when the pool is made (the rest is left to activations), on CPU at most 1 GiB and a
quarter of the available RAM. And at most 65536 blocks on CUDA, 8192 on CPU: the allocator keeps
a small Python record per block, and a tiny model's blocks are tiny.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "HOST_BYTES_PER_BLOCK",
    "available_bytes",
    "default_budget",
    "format_bytes",
    "split_budget",
]

CUDA_DEFAULT_FRACTION = 0.5
CPU_DEFAULT_CAP = 1 << 30
CPU_DEFAULT_FRACTION = 0.25
MAX_DEFAULT_BLOCKS = {"cuda": 65536, "cpu": 8192}
HOST_BYTES_PER_BLOCK = 256  # the allocator's record of one block, in host memory (generous)


def available_bytes(device: torch.device) -> int:
    """Memory free for a new allocation on `device` now (host RAM for CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return _available_ram()


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def default_budget(device: torch.device, bytes_per_block: int) -> int:
    """Bytes of the default pool on `device` (at least one block)."""
    if device.type == "cuda":
        budget = int(available_bytes(device) * CUDA_DEFAULT_FRACTION)
    else:
        budget = min(CPU_DEFAULT_CAP, int(available_bytes(device) * CPU_DEFAULT_FRACTION))
    budget = min(budget, MAX_DEFAULT_BLOCKS[device.type] * bytes_per_block)
    return max(budget, bytes_per_block)


def split_budget(
    budget: int,
    bytes_per_block: list[int],
    windows: list[int | None],
    block_size: int,
    context: int,
    crop_step: int,
) -> list[int]:
    """Blocks of each KV cache group for `budget` bytes, so that every group holds as many
    sequences of `context` tokens: a full-attention group all their blocks; a sliding group
    the blocks of its window (or of a prompt of up to `crop_step` tokens, which it keeps whole
    until the next step), plus the one a window straddles."""
    full = -(-context // block_size)
    need = [
        full if w is None else min(full, -(-max(w, min(crop_step, context)) // block_size) + 1)
        for w in windows
    ]
    per_sequence = sum(n * b for n, b in zip(need, bytes_per_block, strict=True))
    sequences = budget / per_sequence
    return [int(sequences * n) for n in need]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
