"""gather_kv: paged -> contiguous K/V, for models whose attention bypasses the registry."""

from __future__ import annotations

import functools

import torch

from . import _checks, _dispatch, reference
from ._checks import (
    INDEX_DTYPES,
    MAX_GRID,
    cdiv,
    check_caches,
    check_grid,
    check_index_vector,
    check_tensor,
    next_power_of_2,
)
from ._triton import tl, triton


# Kernels are laid out by hand: arguments grouped by role, one line of strides per tensor.
# fmt: off
@triton.jit(do_not_specialize=["first_seq", "num_blocks", "num_tokens", "max_positions"])
def _gather_kv_kernel(
    # pointers
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    seq_ends_ptr,
    key_out_ptr,
    value_out_ptr,
    # sizes
    first_seq,  # the sequence of program_id(1) == 0 (launches of more than 65,535 sequences)
    num_blocks,
    num_kv_heads,
    num_tokens,  # rows of key_out / value_out
    max_positions,  # max_blocks * BLOCK_SIZE
    # strides
    stride_kc_b, stride_kc_o, stride_kc_h, stride_kc_d,
    stride_vc_b, stride_vc_o, stride_vc_h, stride_vc_d,
    stride_bt_b, stride_bt_n,
    # meta-parameters
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # key/value cache: [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    # block_tables:    [num_seqs, max_blocks]
    # seq_lens:        [num_seqs], each in [0, max_positions] (the launcher clamps them)
    # seq_ends:        [num_seqs] int64, inclusive prefix sum of seq_lens (a sequence's rows
    #                  end there)
    # key/value out:   [num_tokens, num_kv_heads, head_dim], contiguous (the launcher's)
    # grid:            (cdiv(max_positions, BLOCK_P), sequences): one program per tile of
    #                  BLOCK_P positions of sequence first_seq + program_id(1). Tiles on axis
    #                  0 (up to 2^31 - 1 programs): a context of any length launches.
    HEAD_DIM_PAD: tl.constexpr = triton.next_power_of_2(HEAD_DIM)
    tile = tl.program_id(0).to(tl.int64)
    seq = first_seq + tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
    if tile * BLOCK_P >= seq_len:
        return
    start = tl.load(seq_ends_ptr + seq) - seq_len
    pos = tile * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] int64
    token = start + pos
    # positions past the sequence, and rows past a num_tokens short of sum(seq_lens): cut
    live = (pos < seq_len) & (token < num_tokens)
    block = tl.load(block_tables_ptr + seq * stride_bt_b + (pos // BLOCK_SIZE) * stride_bt_n,
                    mask=live, other=-1).to(tl.int64)
    offset = pos % BLOCK_SIZE

    # [BLOCK_P, HEADS_PAD, HEAD_DIM_PAD] tiles; int64 head and dim offsets (strides of a large
    # pool in a head-major layout times the index may pass 2^31)
    offs_h = tl.arange(0, HEADS_PAD).to(tl.int64)[None, :, None]
    offs_d = tl.arange(0, HEAD_DIM_PAD).to(tl.int64)[None, None, :]
    mask = live[:, None, None] & (offs_h < num_kv_heads) & (offs_d < HEAD_DIM)
    # a block id outside the pool reads nothing: its keys and values come out as zeros
    read = mask & ((block >= 0) & (block < num_blocks))[:, None, None]
    block = block[:, None, None]
    offset = offset[:, None, None]
    k = tl.load(
        key_cache_ptr + block * stride_kc_b + offset * stride_kc_o + offs_h * stride_kc_h
        + offs_d * stride_kc_d,
        mask=read,
        other=0.0,
    )
    v = tl.load(
        value_cache_ptr + block * stride_vc_b + offset * stride_vc_o + offs_h * stride_vc_h
        + offs_d * stride_vc_d,
        mask=read,
        other=0.0,
    )
    out_offs = (token[:, None, None] * num_kv_heads + offs_h) * HEAD_DIM + offs_d
    tl.store(key_out_ptr + out_offs, k, mask=mask)
    tl.store(value_out_ptr + out_offs, v, mask=mask)
# fmt: on


TILE_ELEMENTS = 4096  # elements of K (and of V) one program copies, at most


@functools.lru_cache(maxsize=256)
def block_positions(num_kv_heads: int, head_dim: int) -> int:
    """BLOCK_P: positions per program, so a program copies about TILE_ELEMENTS elements of K
    and of V (at most 64 positions)."""
    row = next_power_of_2(num_kv_heads) * next_power_of_2(head_dim)
    return max(1, min(64, TILE_ELEMENTS // row))


def launch_grids(num_seqs: int, max_positions: int, block_p: int) -> list[tuple[int, tuple]]:
    """The launches of a gather: ``(first_seq, grid)`` each. Tiles of positions go on grid axis
    0 (CUDA allows 2^31 - 1 programs there: a context of any length), sequences on axis 1, at
    most 65,535 per launch (CUDA's limit there): more sequences take more launches."""
    tiles = cdiv(max_positions, block_p)
    per_launch = MAX_GRID[1]
    if num_seqs <= per_launch:
        return [(0, check_grid((tiles, num_seqs), "gather_kv"))]
    return [
        (first, check_grid((tiles, min(per_launch, num_seqs - first)), "gather_kv"))
        for first in range(0, num_seqs, per_launch)
    ]


def gather_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_tokens: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged -> contiguous, the inverse of `write_kv`.

    key_cache/value_cache ``[num_blocks, block_size, Hkv, D]``, block_tables ``[B, max_blocks]``,
    seq_lens ``[B]``. Returns key, value ``[sum(seq_lens), Hkv, D]`` packed in sequence order
    (on the Triton backend, the two halves of one buffer). Pass ``num_tokens=sum(seq_lens)``
    if known, to spare a device->host sync. Any context length and any number of sequences.

    Rejected with a ValueError on CPU tensors and on the torch backend: a seq_len outside
    [0, max_blocks * block_size], a block id outside [0, num_blocks) among the entries a
    sequence reads (the first cdiv(seq_len, block_size) of its row; the rest are never read),
    a num_tokens other than sum(seq_lens). Always rejected: a num_tokens that is not an int >= 0.
    On CUDA (no host sync) the kernel masks instead: seq_lens are clamped to
    [0, max_blocks * block_size], positions in an out-of-range block come out as zeros, and rows
    past num_tokens are not written (rows past sum(seq_lens) are left unset). Nothing outside
    the inputs and outputs is ever read or written.
    """
    check_caches(key_cache, value_cache)
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    device = key_cache.device
    check_tensor(
        block_tables, "block_tables", shape=(None, None), dtypes=INDEX_DTYPES, device=device
    )
    num_seqs, max_blocks = block_tables.shape
    check_index_vector(seq_lens, "seq_lens", length=num_seqs, device=device)
    if num_tokens is not None and (
        isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0
    ):
        raise ValueError(f"num_tokens must be an int >= 0 or None, got {num_tokens!r}")

    backend = _dispatch.resolve_backend(backend, device)
    _dispatch.record("gather_kv", backend)
    max_positions = max_blocks * block_size
    checked = _checks.checks_values(device, backend)
    if checked:
        _checks.check_seq_lens_and_tables(
            block_tables, seq_lens, num_blocks=num_blocks, block_size=block_size
        )
        total = int(seq_lens.sum())
        if num_tokens is not None and num_tokens != total:
            raise ValueError(f"num_tokens = {num_tokens}, expected sum(seq_lens) = {total}")
        num_tokens = total
    if backend == "torch":
        return reference.gather_kv(key_cache, value_cache, block_tables, seq_lens)

    if not checked:
        seq_lens = seq_lens.clamp(0, max_positions)  # on the device: no sync
    if num_tokens is None:
        num_tokens = int(seq_lens.sum())
    out = key_cache.new_empty(2, num_tokens, num_kv_heads, head_dim)  # one allocation for both
    key, value = out.unbind()
    if num_tokens == 0 or max_positions == 0:
        return key, value
    seq_ends = seq_lens.cumsum(0, dtype=torch.int64)
    block_p = block_positions(num_kv_heads, head_dim)
    for first, grid in launch_grids(num_seqs, max_positions, block_p):
        _gather_kv_kernel[grid](
            key_cache,
            value_cache,
            block_tables,
            seq_lens,
            seq_ends,
            key,
            value,
            first,
            num_blocks,
            num_kv_heads,
            num_tokens,
            max_positions,
            *key_cache.stride(),
            *value_cache.stride(),
            *block_tables.stride(),
            BLOCK_SIZE=block_size,
            HEAD_DIM=head_dim,
            HEADS_PAD=next_power_of_2(num_kv_heads),
            BLOCK_P=block_p,
            num_warps=4,
        )
    return key, value
