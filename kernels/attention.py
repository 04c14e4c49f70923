"""paged_attention: one kernel family for decode, prefill, and prefill over a cached prefix.

Each program owns one KV head and a tile of BLOCK_M query rows = BLOCK_Q query tokens x the
GROUP query heads that share that KV head (GQA/MQA), so every K/V tile is loaded once for the
whole group and the group forms the M dimension of ``tl.dot``. Keys are walked in tiles of
BLOCK_N through the block table (a tile may span several pages or part of one). With
SPLIT_K the key range is split across `num_splits` programs (flash-decoding; a runtime argument, so
one compiled kernel serves any split count) and a second kernel merges the partial results by
log-sum-exp.

With a sliding window the tiles wholly before a q-tile's window are skipped and the block-table
entries before it are not read (a sliding KV group sets those of its released blocks to -1).
Attention sinks (gpt-oss) add one logit per query head to each row's softmax: in the epilogue,
or with split-K once, in the merge.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch

from . import _checks, _dispatch, reference
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    SINK_DTYPES,
    check_caches,
    check_index_vector,
    check_tensor,
    next_power_of_2,
)
from ._config import TUNED, KernelConfig, config_key, from_triton_config
from ._triton import tl, triton


# Kernels are laid out by hand: arguments grouped by role, one line of strides per tensor.
# fmt: off
@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, q_block_id, BLOCK_Q: tl.constexpr):
    """Binary search: the sequence whose q-blocks include `q_block_id`. Sequence i's q-blocks
    start at query_start_loc[i] // BLOCK_Q + i, an upper bound that needs no prefix sum."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tile_blocks(tile, kv_lo, kv_hi, bt_row_ptr, stride_bt_n, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr):
    """[BLOCK_N] int64: the block of each key of tile `tile`. Keys at or past kv_hi (or before
    kv_lo with USE_WINDOW) get block -1: their entries are never read, so nothing past the row of
    the block table, nor an entry of a block before the window (which may hold -1)."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    read_entry = offs_n < kv_hi
    if USE_WINDOW:
        read_entry = read_entry & (offs_n >= kv_lo)
    block = tl.load(bt_row_ptr + (offs_n // BLOCK_SIZE) * stride_bt_n, mask=read_entry, other=-1)
    return block.to(tl.int64)


@triton.jit
def _attend_tile(
    tile, block, q, m_i, l_i, acc, row_lo, row_hi, num_blocks,
    k_base, v_base, k_dim, v_dim, d_valid, stride_kc_b, stride_kc_o, stride_vc_b, stride_vc_o,
    slot_valid_ptr, stride_sv_b, stride_sv_o, qk_scale, cap,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    USE_SLOT_VALID: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """One online-softmax step over key tile `tile`: returns the updated (m_i, l_i, acc).
    block: [BLOCK_N] the block of each key (`_tile_blocks`, -1 = not read); q: [BLOCK_M,
    HEAD_DIM_PAD]; m_i, l_i: [BLOCK_M] (log2 domain); acc: [BLOCK_M, HEAD_DIM_PAD]. The loop
    invariants come from the caller: row r sees keys [row_lo[r], row_hi[r]), a bound applied
    only when MASKED (the caller leaves it off for tiles every row sees whole); k_base, v_base
    point at this KV head, k_dim, v_dim: [HEAD_DIM_PAD] offsets of its dims; scores are
    s * qk_scale, then cap * tanh(.) with USE_SOFTCAP. Keys in a block outside [0, num_blocks)
    (-1 included) are never read (they load as zeros); with USE_SLOT_VALID a key whose slot is
    invalid is not attended and its value is not read. (Excluding out-of-pool keys from
    the softmax too would cost the default path a per-key mask on the scores: 8 to 18 more
    registers per thread on sm_90; a load mask costs none.)"""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offset = offs_n % BLOCK_SIZE
    in_pool = (block >= 0) & (block < num_blocks)  # ids outside the pool read as zeros

    # k: [HEAD_DIM_PAD, BLOCK_N]. Addresses as base + slot + dim: ptxas (sm_90) keeps more
    # configs spill-free in this order than with the dims added first.
    k_slots = block * stride_kc_b + offset * stride_kc_o
    k = tl.load(k_base + k_slots[None, :] + k_dim[:, None],
                mask=d_valid[:, None] & in_pool[None, :], other=0.0)
    # s: [BLOCK_M, BLOCK_N] fp32; fp32 caches get a true fp32 dot, not tf32
    s = tl.dot(q, k, input_precision="ieee") if FP32_DOT else tl.dot(q, k)
    s = s * qk_scale
    if USE_SOFTCAP:  # cap * tanh(s), tanh written with exp2 (no libdevice needed)
        s = (1.0 - 2.0 / (tl.exp2(s * (2.0 * 1.4426950408889634)) + 1.0)) * cap
    if MASKED:
        visible = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
        s = tl.where(visible, s, float("-inf"))
    read_v = in_pool
    if USE_SLOT_VALID:  # an invalid slot is not attended, its V (maybe NaN) not read
        slot_valid = tl.load(slot_valid_ptr + block * stride_sv_b + offset * stride_sv_o,
                             mask=in_pool, other=1) != 0
        s = tl.where(slot_valid[None, :], s, float("-inf"))
        read_v = read_v & slot_valid

    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)

    # v: [BLOCK_N, HEAD_DIM_PAD]; keys not read hold 0, never NaN (p is 0 there)
    v_slots = block * stride_vc_b + offset * stride_vc_o
    v = tl.load(v_base + v_slots[:, None] + v_dim[None, :],
                mask=read_v[:, None] & d_valid[None, :], other=0.0)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attend_range(
    tile_lo, tile_hi, q, m_i, l_i, acc, row_lo, row_hi, kv_lo, kv_hi, num_blocks, bt_row_ptr,
    stride_bt_n, k_base, v_base, k_dim, v_dim, d_valid, stride_kc_b, stride_kc_o, stride_vc_b,
    stride_vc_o, slot_valid_ptr, stride_sv_b, stride_sv_o, qk_scale, cap,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SLOT_VALID: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    FP32_DOT: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    """`_attend_tile` over tiles [tile_lo, tile_hi): returns the updated (m_i, l_i, acc).

    Compiled, the loop reads each tile's block ids one tile ahead, so the addresses of a tile's
    K/V loads come from the previous iteration: Triton's pipeliner then keeps num_stages - 1
    K/V tiles in flight (with the table load in the same iteration it waits for every copy).
    The interpreter keeps scalars as 1-element arrays, which numpy >= 2.3 refuses as range()
    bounds: it walks the tiles with a while loop. The loop body is the same function either way.
    """
    if WHILE_LOOP:
        tile = tile_lo
        while tile < tile_hi:
            block = _tile_blocks(tile, kv_lo, kv_hi, bt_row_ptr, stride_bt_n, BLOCK_SIZE, BLOCK_N,
                                 USE_WINDOW)
            m_i, l_i, acc = _attend_tile(
                tile, block, q, m_i, l_i, acc, row_lo, row_hi, num_blocks, k_base, v_base, k_dim,
                v_dim, d_valid, stride_kc_b, stride_kc_o, stride_vc_b, stride_vc_o,
                slot_valid_ptr, stride_sv_b, stride_sv_o, qk_scale, cap,
                BLOCK_SIZE, BLOCK_N, MASKED, USE_SLOT_VALID, USE_SOFTCAP, FP32_DOT,
            )
            tile += 1
    else:
        block = _tile_blocks(tile_lo, kv_lo, kv_hi, bt_row_ptr, stride_bt_n, BLOCK_SIZE, BLOCK_N,
                             USE_WINDOW)
        for tile in range(tile_lo, tile_hi):
            next_block = _tile_blocks(tile + 1, kv_lo, kv_hi, bt_row_ptr, stride_bt_n, BLOCK_SIZE,
                                      BLOCK_N, USE_WINDOW)
            m_i, l_i, acc = _attend_tile(
                tile, block, q, m_i, l_i, acc, row_lo, row_hi, num_blocks, k_base, v_base, k_dim,
                v_dim, d_valid, stride_kc_b, stride_kc_o, stride_vc_b, stride_vc_o,
                slot_valid_ptr, stride_sv_b, stride_sv_o, qk_scale, cap,
                BLOCK_SIZE, BLOCK_N, MASKED, USE_SLOT_VALID, USE_SOFTCAP, FP32_DOT,
            )
            block = next_block
    return m_i, l_i, acc


@triton.jit(
    do_not_specialize=["num_splits", "num_seqs", "num_tokens", "num_blocks", "max_keys",
                       "sliding_window"]
)
def _paged_attention_kernel(
    # pointers
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    slot_valid_ptr,  # [num_blocks, BLOCK_SIZE] uint8, 0 = never attended (USE_SLOT_VALID only)
    sinks_ptr,  # [num_q_heads] any float dtype, a logit per query head (USE_SINKS only)
    out_ptr,
    partial_out_ptr,  # [num_splits, num_tokens, num_q_heads, HEAD_DIM_PAD] fp32 (SPLIT_K only)
    partial_lse_ptr,  # [num_splits, num_tokens, num_q_heads] fp32, log2 domain
    # sizes and scalars
    num_splits,  # key-range partitions (grid axis 2); 1 unless SPLIT_K
    num_seqs,
    num_tokens,
    num_blocks,
    max_keys,  # max_blocks * BLOCK_SIZE: the keys a block-table row covers
    scale,
    softcap,
    sliding_window,
    # strides
    stride_q_t, stride_q_h, stride_q_d,
    stride_kc_b, stride_kc_o, stride_kc_h, stride_kc_d,
    stride_vc_b, stride_vc_o, stride_vc_h, stride_vc_d,
    stride_bt_b, stride_bt_n,
    stride_sv_b, stride_sv_o,
    stride_sk_h,
    stride_o_t, stride_o_h, stride_o_d,
    stride_po_s, stride_po_t, stride_po_h,
    stride_pl_s, stride_pl_t,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IS_DECODE: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SLOT_VALID: tl.constexpr,
    USE_SINKS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    # query, out:             [num_tokens, num_q_heads, head_dim], packed over sequences
    # key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    # block_tables:           [num_seqs, max_blocks]; seq_lens: [num_seqs]
    # query_start_loc:        [num_seqs + 1] (unused when IS_DECODE: one query per sequence)
    # slot_valid:             [num_blocks, block_size] (any strides)
    # sinks:                  [num_q_heads] (any stride); applied here, or with SPLIT_K once in
    #                         _merge_splits_kernel
    # grid:                   (q-blocks, num_kv_heads, num_splits)
    # Whatever the index values, nothing outside the tensors is read or written: keys stop at
    # max_keys, block ids outside [0, num_blocks) are not read (their keys load as zeros), query
    # rows outside [0, num_tokens) are neither read nor written. With USE_WINDOW the block-table
    # entries of keys before a q-tile's window (kv_lo) are not read: they may hold anything.
    q_block_id = tl.program_id(0)
    if not IS_DECODE:  # the last (causal: heaviest) q-blocks first, so the light ones fill the tail
        q_block_id = tl.num_programs(0) - 1 - q_block_id
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    if IS_DECODE:
        seq = q_block_id
        q_start = q_block_id
        q_len = tl.full([], 1, tl.int32)
        q_block = q_block_id * 0
    else:
        seq = _find_seq(query_start_loc_ptr, num_seqs, q_block_id, BLOCK_Q)
        if seq < 0:  # no sequence starts this early: a query_start_loc not starting at 0
            return
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        q_block = q_block_id - (q_start // BLOCK_Q + seq)
    q_first = q_block * BLOCK_Q  # first query of this tile, counted within the sequence
    if q_first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    # Rows: query token (row // GROUP_PAD) x query head of the group (row % GROUP_PAD).
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_first + offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    row_valid = (offs_m // GROUP_PAD < BLOCK_Q) & (q_idx < q_len) & (head_in_group < GROUP)
    q_head = kv_head * GROUP + head_in_group
    q_token = (q_start + q_idx).to(tl.int64)
    if not IS_DECODE:
        row_valid = row_valid & (q_token >= 0) & (q_token < num_tokens)
    q_pos = seq_len - q_len + q_idx  # position of each row's query; negative for left padding

    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q = tl.load(
        query_ptr + q_token[:, None] * stride_q_t + q_head[:, None] * stride_q_h
        + offs_d[None, :] * stride_q_d,
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )

    # The keys this tile may see: [kv_lo, kv_hi), cut into BLOCK_N tiles shared among splits.
    pos_first = seq_len - q_len + q_first
    pos_last = seq_len - q_len + tl.minimum(q_first + BLOCK_Q, q_len) - 1
    kv_hi = tl.maximum(tl.minimum(seq_len, max_keys), 0)  # never past the block-table row
    if CAUSAL:
        kv_hi = tl.minimum(kv_hi, pos_last + 1)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(pos_first - sliding_window + 1, 0)
    tile_lo = kv_lo // BLOCK_N
    num_tiles = tl.maximum(tl.cdiv(kv_hi, BLOCK_N) - tile_lo, 0)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_start = tile_lo + split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, tile_lo + num_tiles)

    # Loop invariants. Row r sees keys [row_lo[r], row_hi[r]): none for rows past the tile, up to
    # its own position when causal, within the window. Scores go to the log2 domain (the softmax
    # uses exp2): s * scale * log2(e), or softcap * tanh(s * scale / softcap) * log2(e).
    row_hi = tl.where(row_valid, kv_hi, 0)
    if CAUSAL:
        row_hi = tl.minimum(row_hi, q_pos + 1)
    row_lo = tl.zeros([BLOCK_M], dtype=row_hi.dtype)
    if USE_WINDOW:
        row_lo = q_pos - sliding_window + 1
    if USE_SOFTCAP:
        qk_scale = scale / softcap
        cap = softcap * 1.4426950408889634
    else:
        qk_scale = scale * 1.4426950408889634
        cap = 1.0
    k_base = key_cache_ptr + kv_head * stride_kc_h
    v_base = value_cache_ptr + kv_head * stride_vc_h
    k_dim = offs_d * stride_kc_d
    v_dim = offs_d * stride_vc_d
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_b
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # Tiles every valid row sees whole need no bound on the scores: keys [full_lo, full_hi) are
    # visible to every row of the tile (causal: up to the first query; window: from the last
    # query's window start). The tiles before and after them are attended with the bound.
    full_hi = kv_hi
    if CAUSAL:
        full_hi = tl.maximum(tl.minimum(kv_hi, pos_first + 1), 0)
    full_lo = kv_lo
    if USE_WINDOW:
        full_lo = tl.maximum(pos_last - sliding_window + 1, kv_lo)
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N), tile_start), tile_end)
    mid_hi = tl.minimum(tl.maximum(full_hi // BLOCK_N, mid_lo), tile_end)
    m_i, l_i, acc = _attend_range(
        tile_start, mid_lo, q, m_i, l_i, acc, row_lo, row_hi, kv_lo, kv_hi, num_blocks, bt_row_ptr,
        stride_bt_n, k_base, v_base, k_dim, v_dim, d_valid, stride_kc_b, stride_kc_o, stride_vc_b,
        stride_vc_o, slot_valid_ptr, stride_sv_b, stride_sv_o, qk_scale, cap,
        BLOCK_SIZE, BLOCK_N, True, USE_WINDOW, USE_SLOT_VALID, USE_SOFTCAP, FP32_DOT, WHILE_LOOP,
    )
    m_i, l_i, acc = _attend_range(
        mid_lo, mid_hi, q, m_i, l_i, acc, row_lo, row_hi, kv_lo, kv_hi, num_blocks, bt_row_ptr,
        stride_bt_n, k_base, v_base, k_dim, v_dim, d_valid, stride_kc_b, stride_kc_o, stride_vc_b,
        stride_vc_o, slot_valid_ptr, stride_sv_b, stride_sv_o, qk_scale, cap,
        BLOCK_SIZE, BLOCK_N, False, USE_WINDOW, USE_SLOT_VALID, USE_SOFTCAP, FP32_DOT, WHILE_LOOP,
    )
    m_i, l_i, acc = _attend_range(
        mid_hi, tile_end, q, m_i, l_i, acc, row_lo, row_hi, kv_lo, kv_hi, num_blocks, bt_row_ptr,
        stride_bt_n, k_base, v_base, k_dim, v_dim, d_valid, stride_kc_b, stride_kc_o, stride_vc_b,
        stride_vc_o, slot_valid_ptr, stride_sv_b, stride_sv_o, qk_scale, cap,
        BLOCK_SIZE, BLOCK_N, True, USE_WINDOW, USE_SLOT_VALID, USE_SOFTCAP, FP32_DOT, WHILE_LOOP,
    )

    # A row that saw no key (l_i == 0) outputs exactly 0.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    if USE_SINKS and not SPLIT_K:
        # The sink's logit (log2 domain) joins the softmax sum; its probability is dropped.
        # A row that saw no key adds 1 to its 1: 0 / 2 (a sink of -inf there is no NaN).
        sink = tl.load(sinks_ptr + q_head * stride_sk_h, mask=row_valid, other=0.0)
        sink = sink.to(tl.float32) * 1.4426950408889634
        saw_any = l_i > 0.0
        l_safe += tl.exp2(tl.where(saw_any, sink - tl.where(saw_any, m_i, 0.0), 0.0))
    o = acc / l_safe[:, None]
    out_mask = row_valid[:, None] & d_valid[None, :]
    if not SPLIT_K:
        o_ptrs = (
            out_ptr + q_token[:, None] * stride_o_t + q_head[:, None] * stride_o_h
            + offs_d[None, :] * stride_o_d
        )
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        split_off = split.to(tl.int64)
        po_ptrs = (
            partial_out_ptr + split_off * stride_po_s + q_token[:, None] * stride_po_t
            + q_head[:, None] * stride_po_h + offs_d[None, :]
        )
        tl.store(po_ptrs, o, mask=out_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(partial_lse_ptr + split_off * stride_pl_s + q_token * stride_pl_t + q_head, lse,
                 mask=row_valid)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    # pointers
    partial_out_ptr,
    partial_lse_ptr,
    sinks_ptr,  # USE_SINKS only
    out_ptr,
    # sizes
    num_splits,  # at most MAX_SPLITS
    # strides
    stride_po_s, stride_po_t, stride_po_h,
    stride_pl_s, stride_pl_t,
    stride_sk_h,
    stride_o_t, stride_o_h, stride_o_d,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    # partial_out: [num_splits, num_tokens, num_q_heads, >= HEAD_DIM] fp32, each split normalised
    # partial_lse: [num_splits, num_tokens, num_q_heads] fp32 log2-sum-exp, -inf = saw no key
    # sinks:       [num_q_heads] any float dtype (any stride): one more logit in each softmax
    # out:         [num_tokens, num_q_heads, head_dim]
    # grid:        (num_tokens, num_q_heads)
    HEAD_DIM_PAD: tl.constexpr = triton.next_power_of_2(HEAD_DIM)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, MAX_SPLITS).to(tl.int64)  # splits x tokens x heads x dims passes 2^31
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    lse_ptrs = partial_lse_ptr + token * stride_pl_t + head
    lse = tl.load(lse_ptrs + offs_s * stride_pl_s, mask=offs_s < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    if USE_SINKS:  # the sink counts once, here: its weight joins the total, not the output
        sink = tl.load(sinks_ptr + head * stride_sk_h).to(tl.float32) * 1.4426950408889634
        lse_max = tl.maximum(lse_max, sink)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.sum(tl.exp2(lse - lse_max), 0)  # splits that saw no key weigh 0
    if USE_SINKS:
        total += tl.exp2(sink - lse_max)
    # One split's row at a time: the runtime split count needs no register tile per split.
    o = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    po_ptrs = partial_out_ptr + token * stride_po_t + head * stride_po_h + offs_d
    split = tl.full([], 0, tl.int64)
    while split < num_splits:
        weight = tl.exp2(tl.load(lse_ptrs + split * stride_pl_s) - lse_max)
        o += tl.load(po_ptrs + split * stride_po_s, mask=d_valid, other=0.0) * weight
        split += 1
    o = o / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d * stride_o_d,
             o.to(out_ptr.dtype.element_ty), mask=d_valid)
# fmt: on


def _accumulator_regs(block_m: int, block_n: int, head_dim_pad: int, num_warps: int) -> float:
    """fp32 registers per thread for the output accumulator and the score tile."""
    return block_m * (head_dim_pad + block_n) / (32 * num_warps)


SHARED_LIMIT = 227 * 1024  # bytes of shared memory one program may use on sm_90


def _shared_bytes(block_m: int, block_n: int, head_dim_pad: int, num_stages: int,
                  fp32: bool) -> int:  # fmt: skip
    """Shared memory a compiled program uses at most (checked against the compiler over the
    candidate space in tests/kernels/test_gpu_compile.py): the pipeliner keeps num_stages - 1
    K and V tiles in flight, plus layout-conversion scratch for the query and score tiles."""
    element = 4 if fp32 else 2
    in_flight = (num_stages - 1) * 2 * block_n * head_dim_pad * element
    return in_flight + 3 * block_m * head_dim_pad * element + block_m * block_n * 4


def _fits(block_m: int, block_n: int, head_dim_pad: int, num_warps: int, num_stages: int,
          fp32: bool) -> bool:  # fmt: skip
    """Whether a tile runs spill-free within shared memory on sm_90 (rules checked against
    ptxas -v over the candidate space, see tests/kernels/test_gpu_compile.py). fp32 caches use
    an IEEE dot on the FMA units, which needs small tiles and 8 warps."""
    shared = _shared_bytes(block_m, block_n, head_dim_pad, num_stages, fp32)
    if shared > SHARED_LIMIT:
        return False
    if fp32:
        return block_m <= 16 and block_n == 32 and num_warps == 8
    regs = _accumulator_regs(block_m, block_n, head_dim_pad, num_warps)
    return block_n >= 32 and regs < 128


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
    """The configs that fit this launch's head dim, query tile and dtype (see `_fits`); if none
    does, the smallest tile with the most warps, which the fp32 default also uses."""
    args = {**named_args, **kwargs}
    head_dim_pad, block_m = int(args["HEAD_DIM_PAD"]), int(args["BLOCK_M"])
    fp32 = bool(args["FP32_DOT"])
    kept = [
        c
        for c in configs
        if _fits(block_m, c.kwargs["BLOCK_N"], head_dim_pad, c.num_warps, c.num_stages, fp32)
    ]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], -c.num_warps, c.num_stages))]


# The candidate space examples/autotune.py sweeps (launchers never autotune by themselves).
# Smallest tiles first (the cheapest under the interpreter).
_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
    for block_n in (32, 64, 128)
    for num_warps in (4, 8)  # 2 warps spill with the block ids carried a tile ahead
    for num_stages in (3, 4)  # 2 stages never keep a K/V tile in flight
]
_TUNED_FIELDS = ("block_n", "num_warps", "num_stages")  # what a sweep tunes; block_m is fixed
MAX_SPLITS = 64  # split-K partitions at most (the merge kernel holds one lse per split)


def choose_num_splits(num_programs: int, max_context: int, block_n: int, num_sms: int) -> int:
    """Split-K factor: enough programs to fill ~2 waves of SMs, at least 4 key tiles per split,
    at most MAX_SPLITS. `max_context` is an upper bound (block table width x block size), so no
    device->host sync is needed."""
    if num_programs >= num_sms or max_context <= 0:
        return 1
    wanted = math.ceil(2 * num_sms / max(num_programs, 1))
    tiles = math.ceil(max_context / block_n)
    return max(1, min(wanted, tiles // 4, MAX_SPLITS))


@functools.lru_cache(maxsize=64)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _pads(head_dim: int, group: int) -> tuple[int, int]:
    """(HEAD_DIM_PAD, GROUP_PAD): tl.dot needs K >= 16."""
    return max(next_power_of_2(head_dim), 16), next_power_of_2(group)


@functools.lru_cache(maxsize=1024)
def _default_config(is_decode: bool, head_dim_pad: int, group_pad: int, fp32: bool) -> KernelConfig:
    """The shipped default: what a launch runs without a tuned config (and the fields a partial
    config leaves open). Three stages keep two K/V tiles in flight; prefill takes 128 query rows
    where head_dim allows (each K/V tile serves twice the queries of 64 rows). 8 warps: with 4,
    decode with a window and sinks already spills on sm_90 (ptxas caps it at 128 registers)."""
    if fp32:
        return KernelConfig(block_m=max(16, group_pad), block_n=32, num_warps=8, num_stages=3)
    block_m = 16 if is_decode else (128 if head_dim_pad <= 128 else 64)
    block_m = max(block_m, group_pad)
    block_n = 64 if head_dim_pad <= 128 else 32
    return KernelConfig(block_m=block_m, block_n=block_n, num_warps=8, num_stages=3)


def candidate_configs(
    *, head_dim: int, group: int, dtype: torch.dtype, mode: str
) -> list[KernelConfig]:
    """The candidate configs for launches of this key and query-head group (Hq // Hkv): the
    space examples/autotune.py sweeps, pruned to the configs that fit such a launch, with only
    the fields a sweep tunes. Each, set as the tuned config of the key, makes the launcher run
    exactly that config."""
    if mode not in ("decode", "prefill"):
        raise ValueError(f"mode must be 'decode' or 'prefill', got {mode!r}")
    head_dim_pad, group_pad = _pads(head_dim, group)
    fp32 = dtype == torch.float32
    defaults = _default_config(mode == "decode", head_dim_pad, group_pad, fp32)
    block_m = max(defaults.block_m, group_pad, 16)  # as the launcher computes it
    meta = {"HEAD_DIM_PAD": head_dim_pad, "BLOCK_M": block_m, "FP32_DOT": fp32}
    return [from_triton_config(c, _TUNED_FIELDS) for c in _prune(_AUTOTUNE_CONFIGS, meta)]


class _LaunchPlan(NamedTuple):
    """What a launch of one shape family runs, worked out once (`_launch_plan` caches it)."""

    meta: dict[str, Any]  # the kernel's meta-parameters and launch options but SPLIT_K
    block_q: int  # query tokens per q-block
    block_n: int
    head_dim_pad: int
    num_splits: int | None  # the config's split count; None: chosen per launch


@functools.lru_cache(maxsize=1024)
def _launch_plan(
    is_decode: bool, head_dim: int, block_size: int, num_q_heads: int, num_kv_heads: int,
    dtype: torch.dtype, config: KernelConfig | None, tuned_version: int, causal: bool,
    use_window: bool, use_softcap: bool, use_slot_valid: bool, use_sinks: bool,
) -> _LaunchPlan:  # fmt: skip
    """The config (explicit, else tuned by key, else the shipped default) and meta-parameters
    of a launch. Keyed on shapes and switches, never lengths; `tuned_version` changes whenever a
    tuned config is set, loaded or cleared, so a new tuned config takes effect at once."""
    group = num_q_heads // num_kv_heads
    head_dim_pad, group_pad = _pads(head_dim, group)
    if config is None:
        mode = "decode" if is_decode else "prefill"
        key = config_key(head_dim=head_dim, block_size=block_size, dtype=dtype, mode=mode)
        config = TUNED.get("paged_attention", key)
    fp32 = dtype == torch.float32
    config = (config or _NO_CONFIG).merged(_default_config(is_decode, head_dim_pad, group_pad, fp32))
    if config.block_n < 16:
        raise ValueError(f"config block_n must be >= 16 (tl.dot needs it), got {config.block_n}")
    block_m = max(config.block_m, group_pad, 16)
    block_q = block_m // group_pad
    meta = {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": head_dim_pad,
        "BLOCK_SIZE": block_size,
        "GROUP": group,
        "GROUP_PAD": group_pad,
        "BLOCK_M": block_m,
        "BLOCK_Q": block_q,
        "BLOCK_N": config.block_n,
        "IS_DECODE": is_decode,
        # a decode query is the sequence's last token: causality is implied by k < seq_len
        "CAUSAL": causal and not is_decode,
        "USE_WINDOW": use_window,
        "USE_SOFTCAP": use_softcap,
        "USE_SLOT_VALID": use_slot_valid,
        "USE_SINKS": use_sinks,
        "FP32_DOT": fp32,
        "WHILE_LOOP": _dispatch.triton_interpreted(),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    return _LaunchPlan(meta, block_q, config.block_n, head_dim_pad, config.num_splits)


_NO_CONFIG = KernelConfig()


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    query_start_loc: torch.Tensor | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    slot_valid: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
    config: KernelConfig | dict | None = None,
) -> torch.Tensor:
    """Attention of packed queries over a paged KV cache.

    query ``[T, Hq, D]`` packed over B sequences; key_cache/value_cache
    ``[num_blocks, block_size, Hkv, D]`` (any strides; Hq % Hkv == 0, query head h reads kv head
    h // (Hq // Hkv)); block_tables ``[B, max_blocks]`` int32; seq_lens ``[B]`` int32 = keys in the
    cache per sequence, the queries' own K/V included (at most max_blocks * block_size; see
    below for the entries of a table row that are read); query_start_loc ``[B + 1]`` int32
    cumulative query counts, None for decode (T == B, one query per sequence).

    Sequence i's queries are its last q_len_i tokens: query j sits at position
    p = seq_len_i - q_len_i + j and sees key k iff k < seq_len_i, (not causal or k <= p),
    (sliding_window is None or p - k < sliding_window) and (slot_valid is None or the slot of
    key k is valid). Scores are (q . k) * scale, then softcap * tanh(scores / softcap) if softcap
    is set; softmax and accumulation in fp32. A query that sees no key (q_len_i > seq_len_i left
    padding, or every key it may see invalid) outputs exactly 0. Returns ``[T, Hq, D]`` in the
    query dtype (written into ``out`` if given).

    The entries of a table row that are read: the first cdiv(seq_len_i, block_size); with a
    sliding window only those from block (seq_len_i - q_len_i - sliding_window + 1) //
    block_size on (the blocks before lie wholly before every query's window: a sliding KV
    group releases them and may set their entries to -1). Other entries may hold anything.

    sinks: ``[Hq]`` any float dtype (used in fp32) on the query's device, or None (no cost, the
    kernel compiles without it). gpt-oss attention sinks: each query row of head h takes one
    more logit sinks[h] into its softmax (not scaled, not softcapped) and drops its probability:
    out = sum_k p_k v_k with p_k = exp(s_k) / (sum_j exp(s_j) + exp(sinks[h])) over the row's
    visible scores s. A row that sees no key still outputs exactly 0. Split-K counts the sink
    once, when the splits are merged.

    slot_valid: ``[num_blocks, block_size]`` bool or uint8 on the caches' device, any strides;
    slot (block b, offset o) is attended only where it is True / nonzero (holes, right padding).
    None: every slot is valid, at no cost (the kernel compiles without it).

    Rejected with a ValueError on CPU tensors and on the torch backend: a seq_len outside
    [0, max_blocks * block_size]; a block id outside [0, num_blocks) among the entries a sequence
    reads (see above; the rest are never read); a query_start_loc that does not rise from 0 to
    T. On CUDA (no host sync) the kernel masks instead: a sequence sees at most its row's
    max_blocks * block_size keys (positions still count from its seq_len),
    keys in a block outside the pool are not read but load as zeros (they still take softmax
    weight, with zero values: finite, wrong numbers, like gather_kv's zero rows), and query rows
    outside [0, T) are neither read nor written (rows no sequence covers are left unset).
    Nothing outside the inputs and ``out`` is ever read or written.

    config: a KernelConfig (or dict) with block_m, block_n, num_splits, num_warps, num_stages.
    """
    check_tensor(query, "query", shape=(None, None, None), dtypes=FLOAT_DTYPES)
    num_tokens, num_q_heads, head_dim = query.shape
    device = query.device
    check_caches(key_cache, value_cache, head_dim=head_dim, device=device)
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    if key_cache.dtype != query.dtype:
        raise ValueError(
            f"key_cache dtype {key_cache.dtype} differs from query dtype {query.dtype}; cast one"
        )
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})"
        )
    check_tensor(
        block_tables, "block_tables", shape=(None, None), dtypes=INDEX_DTYPES, device=device
    )
    num_seqs, max_blocks = block_tables.shape
    check_index_vector(seq_lens, "seq_lens", length=num_seqs, device=device)
    if query_start_loc is None:
        if num_tokens != num_seqs:
            raise ValueError(
                f"decode (query_start_loc=None) needs one query per sequence: query has "
                f"{num_tokens} tokens, block_tables {num_seqs} sequences"
            )
    else:
        check_index_vector(query_start_loc, "query_start_loc", length=num_seqs + 1, device=device)
    if out is not None:
        check_tensor(out, "out", shape=tuple(query.shape), dtypes=(query.dtype,), device=device)
    if sinks is not None:
        check_tensor(sinks, "sinks", shape=(num_q_heads,), dtypes=SINK_DTYPES, device=device)
    if slot_valid is not None:
        check_tensor(
            slot_valid,
            "slot_valid",
            shape=(num_blocks, block_size),
            dtypes=(torch.bool, torch.uint8),
            device=device,
        )
    window_ok = isinstance(sliding_window, int) and not isinstance(sliding_window, bool)
    if sliding_window is not None and (not window_ok or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not softcap > 0):
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    config = KernelConfig.coerce(config)
    if config is not None and config.num_splits is not None and config.num_splits > MAX_SPLITS:
        raise ValueError(f"config num_splits must be at most {MAX_SPLITS}, got {config.num_splits}")

    backend = _dispatch.resolve_backend(backend, device)
    _dispatch.record("paged_attention", backend)
    if _checks.checks_values(device, backend):
        if query_start_loc is not None:  # first: the window's first entry read depends on it
            _checks.check_query_start_loc(query_start_loc, num_tokens)
        first_read = _checks.first_block_read(
            seq_lens, query_start_loc, sliding_window=sliding_window, block_size=block_size
        )
        _checks.check_seq_lens_and_tables(
            block_tables,
            seq_lens,
            num_blocks=num_blocks,
            block_size=block_size,
            first_read=first_read,
        )
    if backend == "torch":
        return reference.paged_attention(
            query,
            key_cache,
            value_cache,
            block_tables,
            seq_lens,
            scale=scale,
            query_start_loc=query_start_loc,
            causal=causal,
            sliding_window=sliding_window,
            softcap=softcap,
            sinks=sinks,
            slot_valid=slot_valid,
            out=out,
        )

    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    is_decode = query_start_loc is None
    plan = _launch_plan(
        is_decode, head_dim, block_size, num_q_heads, num_kv_heads, query.dtype, config,
        TUNED.version, bool(causal), sliding_window is not None, softcap is not None,
        slot_valid is not None, sinks is not None,
    )  # fmt: skip
    # decode: one q-block per sequence; else an upper bound on the q-blocks (see _find_seq)
    num_q_blocks = num_seqs if is_decode else num_tokens // plan.block_q + num_seqs
    num_splits = plan.num_splits
    if num_splits is None:
        num_splits = choose_num_splits(
            num_q_blocks * num_kv_heads, max_blocks * block_size, plan.block_n, _num_sms(device)
        )
    split_k = num_splits > 1
    if split_k:
        partial_out = torch.empty(
            num_splits, num_tokens, num_q_heads, plan.head_dim_pad, dtype=torch.float32,
            device=device,
        )  # fmt: skip
        partial_lse = torch.empty(
            num_splits, num_tokens, num_q_heads, dtype=torch.float32, device=device
        )
        po_strides, pl_strides = partial_out.stride()[:3], partial_lse.stride()[:2]
    else:
        partial_out = partial_lse = out  # unused placeholders
        po_strides, pl_strides = (0, 0, 0), (0, 0)
    if slot_valid is not None:
        slot_valid = slot_valid.view(torch.uint8)  # bool as bytes: one kernel for both dtypes
        sv_strides = slot_valid.stride()
    else:
        slot_valid, sv_strides = seq_lens, (0, 0)  # unused placeholder
    sk_stride = 0
    if sinks is not None:
        sk_stride = sinks.stride(0)
    else:
        sinks = seq_lens  # unused placeholder

    _paged_attention_kernel[(num_q_blocks, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens,
        seq_lens if is_decode else query_start_loc,
        slot_valid, sinks, out, partial_out, partial_lse,
        num_splits, num_seqs, num_tokens, num_blocks, max_blocks * block_size,
        float(scale), float(softcap or 1.0), int(sliding_window or 0),
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_tables.stride(),
        *sv_strides, sk_stride, *out.stride(), *po_strides, *pl_strides,
        **plan.meta, SPLIT_K=split_k,
    )  # fmt: skip
    if split_k:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            partial_out,
            partial_lse,
            sinks,
            out,
            num_splits,
            *po_strides,
            *pl_strides,
            sk_stride,
            *out.stride(),
            HEAD_DIM=head_dim,
            MAX_SPLITS=MAX_SPLITS,
            USE_SINKS=plan.meta["USE_SINKS"],
            num_warps=4,
        )
    return out
