"""gather_kv: paged -> contiguous K/V, for models whose attention bypasses the registry."""

from __future__ import annotations

import torch

from . import _checks, _dispatch, reference
from ._checks import (
    INDEX_DTYPES,
    check_caches,
    check_index_vector,
    check_tensor,
    next_power_of_2,
)
from ._triton import tl, triton


# Kernels are laid out by hand: arguments grouped by role, one line of strides per tensor.
# fmt: off
@triton.jit(do_not_specialize=["num_blocks", "num_tokens", "max_positions"])
def _gather_kv_kernel(
    # pointers
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    seq_starts_ptr,
    key_out_ptr,
    value_out_ptr,
    # sizes
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
):
    # key/value cache: [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    # block_tables:    [num_seqs, max_blocks]
    # seq_lens:        [num_seqs], each in [0, max_positions] (the launcher clamps them)
    # seq_starts:      [num_seqs], exclusive prefix sum of seq_lens
    # key/value out:   [num_tokens, num_kv_heads, head_dim], contiguous (the launcher's)
    # grid:            (num_seqs, max_positions); one program per (sequence, position)
    HEAD_DIM_PAD: tl.constexpr = triton.next_power_of_2(HEAD_DIM)
    seq = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    token = tl.load(seq_starts_ptr + seq).to(tl.int64) + pos
    if (pos >= seq_len) | (token >= num_tokens):  # a num_tokens short of sum(seq_lens): cut
        return
    block = tl.load(block_tables_ptr + seq * stride_bt_b + (pos // BLOCK_SIZE) * stride_bt_n)
    block = block.to(tl.int64)
    offset = pos % BLOCK_SIZE

    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    # a block id outside the pool reads nothing: its keys and values come out as zeros
    read = mask & (block >= 0) & (block < num_blocks)
    k = tl.load(
        key_cache_ptr + block * stride_kc_b + offset * stride_kc_o
        + offs_h[:, None] * stride_kc_h + offs_d[None, :] * stride_kc_d,
        mask=read,
        other=0.0,
    )
    v = tl.load(
        value_cache_ptr + block * stride_vc_b + offset * stride_vc_o
        + offs_h[:, None] * stride_vc_h + offs_d[None, :] * stride_vc_d,
        mask=read,
        other=0.0,
    )
    out_offs = (token * num_kv_heads + offs_h[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(key_out_ptr + out_offs, k, mask=mask)
    tl.store(value_out_ptr + out_offs, v, mask=mask)
# fmt: on


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
    seq_lens ``[B]``. Returns key, value ``[sum(seq_lens), Hkv, D]`` packed in sequence order.
    Pass ``num_tokens=sum(seq_lens)`` if known, to spare a device->host sync.

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
    if _checks.checks_values(device, backend):
        _checks.check_seq_lens_and_tables(
            block_tables, seq_lens, num_blocks=num_blocks, block_size=block_size
        )
        total = int(seq_lens.sum())
        if num_tokens is not None and num_tokens != total:
            raise ValueError(f"num_tokens = {num_tokens}, expected sum(seq_lens) = {total}")
        num_tokens = total
    if backend == "torch":
        return reference.gather_kv(key_cache, value_cache, block_tables, seq_lens)

    max_positions = max_blocks * block_size
    seq_lens = seq_lens.clamp(0, max_positions)  # on the device: no sync
    if num_tokens is None:
        num_tokens = int(seq_lens.sum())
    key = key_cache.new_empty(num_tokens, num_kv_heads, head_dim)
    value = value_cache.new_empty(num_tokens, num_kv_heads, head_dim)
    if num_tokens == 0 or max_positions == 0:
        return key, value
    seq_starts = torch.cumsum(seq_lens, 0, dtype=torch.int64) - seq_lens
    _gather_kv_kernel[(num_seqs, max_positions)](
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        seq_starts,
        key,
        value,
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
        num_warps=4,
    )
    return key, value
