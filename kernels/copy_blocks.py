"""copy_blocks: copy whole blocks (every layer, keys and values) for copy-on-write and fork."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, _dispatch, reference
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, cdiv, check_grid, check_tensor, next_power_of_2
from ._triton import tl, triton


# Kernels are laid out by hand: arguments grouped by role, one line of strides per tensor.
# fmt: off
@triton.jit(do_not_specialize=["num_blocks"])
def _copy_blocks_kernel(
    # pointers
    key_cache_ptr,  # layer 0's key cache; its element type types the pointer table too
    value_cache_ptr,
    key_layer_ptrs_ptr,  # [num_layers] int64 data pointers (USE_PTR_TABLE only)
    value_layer_ptrs_ptr,
    block_mapping_ptr,
    # sizes
    num_blocks,
    num_kv_heads,
    block_numel,  # block_size * num_kv_heads * head_dim
    # strides
    stride_layer_k, stride_layer_v,  # elements from one layer's cache to the next (pool mode)
    stride_kc_b, stride_kc_o, stride_kc_h, stride_kc_d,
    stride_vc_b, stride_vc_o, stride_vc_h, stride_vc_d,
    stride_map_n,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    USE_PTR_TABLE: tl.constexpr,
    FLAT: tl.constexpr,
    FLAT_CHUNK: tl.constexpr,
):
    # key/value caches, per layer: [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    # block_mapping:               [num_pairs, 2] (src, dst)
    # grid:                        (num_pairs, num_layers, chunks): FLAT_CHUNK-element chunks of a
    #                              block whose [block_size, Hkv, D] is one contiguous span (FLAT),
    #                              else one program per row (offset in the block)
    pair = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2).to(tl.int64)
    src = tl.load(block_mapping_ptr + pair * stride_map_n).to(tl.int64)
    dst = tl.load(block_mapping_ptr + pair * stride_map_n + 1).to(tl.int64)
    if (src < 0) | (src >= num_blocks) | (dst < 0) | (dst >= num_blocks):
        return  # a pair naming a block outside the pool is skipped

    if USE_PTR_TABLE:
        k_base = tl.load(key_layer_ptrs_ptr + layer).to(key_cache_ptr.dtype)
        v_base = tl.load(value_layer_ptrs_ptr + layer).to(value_cache_ptr.dtype)
    else:
        k_base = key_cache_ptr + layer * stride_layer_k
        v_base = value_cache_ptr + layer * stride_layer_v

    if FLAT:
        offs = chunk * FLAT_CHUNK + tl.arange(0, FLAT_CHUNK)
        mask = offs < block_numel
        k_row = offs
        v_row = offs
    else:
        HEAD_DIM_PAD: tl.constexpr = triton.next_power_of_2(HEAD_DIM)
        # int64: a head or dim stride of a large pool times the index may pass 2^31
        offs_h = tl.arange(0, HEADS_PAD).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM_PAD).to(tl.int64)
        mask = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k_row = chunk * stride_kc_o + offs_h[:, None] * stride_kc_h + offs_d[None, :] * stride_kc_d
        v_row = chunk * stride_vc_o + offs_h[:, None] * stride_vc_h + offs_d[None, :] * stride_vc_d

    k = tl.load(k_base + src * stride_kc_b + k_row, mask=mask)
    v = tl.load(v_base + src * stride_vc_b + v_row, mask=mask)
    tl.store(k_base + dst * stride_kc_b + k_row, k, mask=mask)
    tl.store(v_base + dst * stride_vc_b + v_row, v, mask=mask)
# fmt: on


def _layer_stride(caches: Sequence[torch.Tensor]) -> int | None:
    """Elements between consecutive layers' caches if they are evenly spaced views of one
    storage (the block-major pool), else None."""
    first = caches[0]
    n = len(caches)
    storage = first.untyped_storage().data_ptr()
    if [s.data_ptr() for s in map(torch.Tensor.untyped_storage, caches)].count(storage) != n:
        return None
    if n == 1:
        return 0
    ptrs = list(map(torch.Tensor.data_ptr, caches))
    step_bytes = ptrs[1] - ptrs[0]
    if step_bytes % first.element_size():
        return None
    if step_bytes == 0:
        evenly_spaced = ptrs.count(ptrs[0]) == n
    else:
        evenly_spaced = ptrs == list(range(ptrs[0], ptrs[0] + n * step_bytes, step_bytes))
    return step_bytes // first.element_size() if evenly_spaced else None


def _check_layers(caches: Sequence[object], name: str, first: torch.Tensor) -> None:
    """Every cache of `caches` a tensor of `first`'s shape, dtype and device, and of the strides
    of `caches[0]` (a ValueError naming the first that is not)."""
    shape, dtype, device = first.shape, first.dtype, first.device
    stride = caches[0].stride() if isinstance(caches[0], torch.Tensor) else None
    for i, cache in enumerate(caches):  # one pass of plain comparisons per layer
        if (
            isinstance(cache, torch.Tensor)
            and cache.shape == shape
            and cache.dtype == dtype
            and cache.device == device
        ):
            if cache.stride() == stride:
                continue
            raise ValueError(
                f"{name}[{i}] has strides {cache.stride()}, expected {stride} (those of {name}[0])"
            )
        check_tensor(cache, f"{name}[{i}]", shape=tuple(shape), dtypes=(dtype,), device=device)


def copy_blocks(
    key_caches: Sequence[torch.Tensor] | torch.Tensor,
    value_caches: Sequence[torch.Tensor] | torch.Tensor,
    block_mapping: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Copy block ``block_mapping[i, 0]`` to ``block_mapping[i, 1]`` in every layer's key and
    value cache, in ONE kernel launch.

    key_caches/value_caches: one ``[num_blocks, block_size, Hkv, D]`` cache per layer, all of one
    shape, dtype and strides; or each one tensor ``[num_blocks, num_layers, block_size, Hkv, D]``
    holding every layer (the K or V half of the block-major pool, ``pool[:, :, 0]``), whose
    checks cost the same for any number of layers. block_mapping: ``[N, 2]`` int64 (or int32)
    (src, dst) pairs; dst blocks must be distinct and must not also be sources (copies run in
    parallel).
    When the layers are evenly spaced views of one storage (the block-major pool) the kernel
    walks them from one base pointer; otherwise it reads a table of per-layer data pointers.
    A block whose ``[block_size, Hkv, D]`` is contiguous (the pool, or contiguous caches) is
    copied as one flat span in 4096-element chunks; other layouts row by row.

    Block ids outside [0, num_blocks): rejected with a ValueError on CPU tensors and on the torch
    backend; on CUDA (no host sync) the kernel skips the pair. Nothing outside the caches is
    ever read or written.
    """
    stacked = isinstance(key_caches, torch.Tensor) and key_caches.dim() == 5
    if stacked:
        check_tensor(key_caches, "key_caches", shape=(None,) * 5, dtypes=FLOAT_DTYPES)
        check_tensor(
            value_caches,
            "value_caches",
            shape=tuple(key_caches.shape),
            dtypes=(key_caches.dtype,),
            device=key_caches.device,
        )
        num_blocks, num_layers, block_size, num_kv_heads, head_dim = key_caches.shape
        device = key_caches.device
    else:
        if not isinstance(key_caches, (list, tuple)) or not isinstance(value_caches, (list, tuple)):
            raise ValueError(
                "key_caches and value_caches must be lists of tensors (one per layer), or each "
                "one tensor [num_blocks, num_layers, block_size, num_kv_heads, head_dim]"
            )
        if len(key_caches) != len(value_caches) or not key_caches:
            raise ValueError(
                f"need one key and one value cache per layer, got {len(key_caches)} key and "
                f"{len(value_caches)} value caches"
            )
        first = key_caches[0]
        check_tensor(first, "key_caches[0]", shape=(None, None, None, None), dtypes=FLOAT_DTYPES)
        num_blocks, block_size, num_kv_heads, head_dim = first.shape
        num_layers = len(key_caches)
        device = first.device
        _check_layers(key_caches, "key_caches", first)
        _check_layers(value_caches, "value_caches", first)
    check_tensor(
        block_mapping,
        "block_mapping",
        shape=(None, 2),
        dtypes=INDEX_DTYPES,
        device=device,
    )
    if block_mapping.stride(1) != 1:
        raise ValueError(
            f"block_mapping must have unit stride in dim 1, got {block_mapping.stride(1)}"
        )

    backend = _dispatch.resolve_backend(backend, device)
    _dispatch.record("copy_blocks", backend)
    if _checks.checks_values(device, backend):
        _checks.check_ids_in_range(
            block_mapping,
            "block_mapping",
            low=0,
            high=num_blocks,
            expected=lambda: f"for a pool of {num_blocks} blocks",
        )
    if backend == "torch":
        if stacked:  # block ids index dim 0 of the stacked layers as of a single layer
            reference.copy_blocks([key_caches], [value_caches], block_mapping)
        else:
            reference.copy_blocks(list(key_caches), list(value_caches), block_mapping)
        return
    num_pairs = block_mapping.shape[0]
    if num_pairs == 0 or num_layers == 0:
        return

    if stacked:  # one base pointer per cache; a layer's cache is `stride(1)` elements further
        use_ptr_table = False
        key_step, value_step = key_caches.stride(1), value_caches.stride(1)
        k_strides = _without_layer(key_caches.stride())
        v_strides = _without_layer(value_caches.stride())
        key_base, value_base = key_caches, value_caches
        key_ptrs = value_ptrs = block_mapping  # unused placeholders
    else:
        key_step, value_step = _layer_stride(key_caches), _layer_stride(value_caches)
        use_ptr_table = key_step is None or value_step is None
        if use_ptr_table:
            key_ptrs = torch.tensor([c.data_ptr() for c in key_caches], dtype=torch.int64)
            value_ptrs = torch.tensor([c.data_ptr() for c in value_caches], dtype=torch.int64)
            key_ptrs, value_ptrs = key_ptrs.to(device), value_ptrs.to(device)
            key_step = value_step = 0
        else:
            key_ptrs = value_ptrs = block_mapping  # unused placeholders
        key_base, value_base = first, value_caches[0]
        k_strides, v_strides = first.stride(), value_base.stride()
    block_numel = block_size * num_kv_heads * head_dim
    flat_strides = (num_kv_heads * head_dim, head_dim, 1)
    flat = k_strides[1:] == flat_strides and v_strides[1:] == flat_strides
    flat_chunk = min(next_power_of_2(block_numel), 4096)
    chunks = cdiv(block_numel, flat_chunk) if flat else block_size
    grid = check_grid((num_pairs, num_layers, chunks), "copy_blocks")
    _copy_blocks_kernel[grid](
        key_base,
        value_base,
        key_ptrs,
        value_ptrs,
        block_mapping,
        num_blocks,
        num_kv_heads,
        block_numel,
        key_step,
        value_step,
        *k_strides,
        *v_strides,
        block_mapping.stride(0),
        HEAD_DIM=head_dim,
        HEADS_PAD=next_power_of_2(num_kv_heads),
        USE_PTR_TABLE=use_ptr_table,
        FLAT=flat,
        FLAT_CHUNK=flat_chunk,
        num_warps=4,
    )


def _without_layer(strides: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The strides of one layer's ``[num_blocks, block_size, Hkv, D]`` in a stacked cache."""
    return strides[0], strides[2], strides[3], strides[4]
