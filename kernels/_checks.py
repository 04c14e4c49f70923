"""Argument checks shared by the launchers: ValueError naming actual and expected values."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NoReturn

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
SINK_DTYPES = (*FLOAT_DTYPES, torch.float64)  # attention sinks: any float, used in fp32


def check_tensor(
    t: object,
    name: str,
    *,
    shape: Sequence[int | None],
    dtypes: Sequence[torch.dtype],
    device: torch.device | None = None,
) -> None:
    """`t` is a tensor of len(shape) dims (None = any size), one of `dtypes`, on `device`."""
    # Launchers call this several times per launch: the passing case is one pass of plain
    # comparisons; messages are only built on the way to an error (`_tensor_error`).
    if (
        isinstance(t, torch.Tensor)
        and t.dtype in dtypes
        and (device is None or t.device == device)
        and len(actual := t.shape) == len(shape)
    ):
        for s, a in zip(shape, actual):  # inline: a call per check costs more than the loop
            if s is not None and s != a:
                break
        else:
            return
    _tensor_error(t, name, shape, dtypes, device)


def _shape_matches(actual: torch.Size, shape: Sequence[int | None]) -> bool:
    if len(actual) != len(shape):
        return False
    for s, a in zip(shape, actual):  # noqa: SIM110 (a loop: faster than all() of a generator)
        if s is not None and s != a:
            return False
    return True


def _tensor_error(
    t: object,
    name: str,
    shape: Sequence[int | None],
    dtypes: Sequence[torch.dtype],
    device: torch.device | None,
) -> NoReturn:
    """Raise the ValueError `check_tensor` names for `t` (which fails one of its checks)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not _shape_matches(t.shape, shape):
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {expected}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        actual = str(t.dtype).removeprefix("torch.")
        raise ValueError(f"{name} has dtype {actual}, expected one of {names}")
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
    if (
        isinstance(value_cache, torch.Tensor)
        and value_cache.shape == key_cache.shape
        and value_cache.dtype == key_cache.dtype
        and value_cache.device == key_cache.device
    ):
        return
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
    if t.stride(0) != 1 and t.shape[0] > 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (`triton.cdiv` costs microseconds per call on the host)."""
    return -(-a // b)


# CUDA's grid limits: x up to 2^31 - 1 programs, y and z up to 65,535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def check_grid(grid: tuple[int, ...], op: str) -> tuple[int, ...]:
    """`grid` if it is within CUDA's limits (`MAX_GRID`), else a ValueError naming it."""
    for size, limit in zip(grid, MAX_GRID):
        if size > limit:
            raise ValueError(
                f"{op} would launch a grid of {grid} programs; CUDA allows at most {MAX_GRID}"
            )
    return grid


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ---- values of index tensors ------------------------------------------------------------------
# Which inputs a launcher rejects and which a kernel masks: a launcher checks the values of its
# index tensors (block ids, lengths, slots) on the host only where reading them is free (see
# `checks_values`). On CUDA the Triton kernels never read or write outside their tensors
# whatever those values are: each launcher's docstring says how it masks them.


def checks_values(device: torch.device, backend: str) -> bool:
    """Whether a launcher reads the values of its index tensors to validate them: for CPU
    tensors (free) and on the torch backend (the reference reads them anyway). Not for Triton on
    CUDA: a device->host sync per launch would stall the stream and break CUDA-graph capture."""
    return device.type == "cpu" or backend == "torch"


def _first(bad: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    """The index of the first True of `bad` (row-major), as text ("[1, 2]") and as a tuple."""
    index = tuple(bad.nonzero()[0].tolist())
    return "[" + ", ".join(map(str, index)) + "]", index


def _in_range(ids: torch.Tensor, low: int, high: int) -> bool:
    if ids.numel() == 0:
        return True
    lo, hi = torch.aminmax(ids)
    return int(lo) >= low and int(hi) < high


def check_ids_in_range(
    ids: torch.Tensor,
    name: str,
    *,
    low: int,
    high: int,
    expected: str | Callable[[], str],
    read: torch.Tensor | None = None,
) -> None:
    """Every entry of `ids` (where `read` is True, if given) lies in [low, high); else a
    ValueError "{name}[i, j] = {value} is out of range {expected}" (`expected` may be a
    function that returns the text, so that a passing check builds none)."""
    if _in_range(ids, low, high):
        return
    bad = (ids < low) | (ids >= high)
    if read is not None:
        bad &= read
    if bool(bad.any()):
        where, index = _first(bad)
        text = expected() if callable(expected) else expected
        raise ValueError(f"{name}{where} = {int(ids[index])} is out of range {text}")


def first_block_read(
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor | None,
    *,
    sliding_window: int | None,
    block_size: int,
) -> torch.Tensor | None:
    """``[B]`` int64: the first block-table entry each sequence reads in a paged_attention call,
    None without a sliding window (0 for all). With window W a sequence's first query sits at
    p = seq_len - q_len (q_len 1 for decode: query_start_loc None) and no query of the call sees
    a key before p - W + 1: the entries of blocks wholly before it are never read (a sliding
    group releases those blocks and sets their entries to -1)."""
    if sliding_window is None:
        return None
    seq_lens = seq_lens.long()
    q_lens = 1 if query_start_loc is None else query_start_loc[1:].long() - query_start_loc[:-1]
    return (seq_lens - q_lens - sliding_window + 1).clamp(min=0) // block_size


def check_seq_lens_and_tables(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_blocks: int,
    block_size: int,
    first_read: torch.Tensor | None = None,
) -> None:
    """Each seq_len in [0, width * block_size], and each block id a sequence reads in [0,
    num_blocks): the entries from `first_read` (``[B]``, see `first_block_read`; None: from 0)
    up to cdiv(seq_len, block_size). The rest are never read and may hold anything (-1)."""
    width = block_tables.shape[1]
    max_keys = width * block_size
    check_ids_in_range(
        seq_lens,
        "seq_lens",
        low=0,
        high=max_keys + 1,
        expected=lambda: (
            f"(expected 0 to {max_keys}: block_tables rows hold {width} blocks of "
            f"{block_size} slots)"
        ),
    )
    if _in_range(block_tables, 0, num_blocks):
        return
    blocks_read = (seq_lens.long() + block_size - 1) // block_size
    cols = torch.arange(width, device=seq_lens.device)
    read = cols < blocks_read[:, None]
    if first_read is not None:
        read &= cols >= first_read[:, None]
    check_ids_in_range(
        block_tables,
        "block_tables",
        low=0,
        high=num_blocks,
        expected=lambda: f"for a pool of {num_blocks} blocks",
        read=read,
    )


def check_query_start_loc(query_start_loc: torch.Tensor, num_tokens: int) -> None:
    """Non-decreasing from 0 to `num_tokens` (sequence i's queries are rows qsl[i]:qsl[i + 1])."""
    starts = query_start_loc.tolist()  # B + 1 ints: cheaper as a list than as tensor ops
    if starts[0] != 0 or starts[-1] != num_tokens:
        raise ValueError(
            f"query_start_loc runs from {starts[0]} to {starts[-1]}, expected 0 to {num_tokens} "
            "(the query's tokens)"
        )
    for i, (a, b) in enumerate(zip(starts, starts[1:])):
        if b < a:
            raise ValueError(
                f"query_start_loc[{i + 1}] = {b} is less than query_start_loc[{i}] = {a}, "
                "expected non-decreasing offsets"
            )
