"""Argument checks shared by the launchers: ValueError naming actual and expected values."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    t: object,
    name: str,
    *,
    shape: Sequence[int | None],
    dtypes: Sequence[torch.dtype],
    device: torch.device | None = None,
) -> None:
    """`t` is a tensor of len(shape) dims (None = any size), one of `dtypes`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    actual = t.shape
    mismatch = len(actual) != len(shape) or any(
        s is not None and s != a for s, a in zip(shape, actual, strict=True)
    )
    if mismatch:
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(actual)}, expected {expected}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        actual = str(t.dtype).removeprefix("torch.")
        raise ValueError(f"{name} has dtype {actual}, expected one of {names}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (that of the other tensors)")


def check_caches(
    key_cache: object,
    value_cache: object,
    *,
    head_dim: int | None = None,
    device: torch.device | None = None,
) -> None:
    """A K/V cache pair: `[num_blocks, block_size, num_kv_heads, head_dim]` each, the value
    cache of the key cache's shape, dtype and device (strides may differ)."""
    check_tensor(
        key_cache,
        "key_cache",
        shape=(None, None, None, head_dim),
        dtypes=FLOAT_DTYPES,
        device=device,
    )
    check_tensor(
        value_cache,
        "value_cache",
        shape=tuple(key_cache.shape),
        dtypes=(key_cache.dtype,),
        device=key_cache.device,
    )


def check_index_vector(t: object, name: str, *, length: int | None, device: torch.device) -> None:
    """A contiguous 1-D int32/int64 tensor (the kernels index it with unit stride)."""
    check_tensor(t, name, shape=(length,), dtypes=INDEX_DTYPES, device=device)
    if t.dim() == 1 and t.numel() > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
