"""write_kv: scatter new keys/values into their paged cache slots."""

from __future__ import annotations

import functools

import torch

from . import _checks, _dispatch, reference
from ._checks import (
    FLOAT_DTYPES,
    cdiv,
    check_caches,
    check_grid,
    check_index_vector,
    check_tensor,
    next_power_of_2,
)
from ._config import TUNED, KernelConfig, config_key, from_triton_config
from ._triton import tl, triton


# Kernels are laid out by hand: arguments grouped by role, one line of strides per tensor.
# fmt: off
@triton.jit(do_not_specialize=["num_slots"])
def _write_kv_kernel(
    # pointers
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    # sizes
    num_kv_heads,
    num_slots,  # num_blocks * BLOCK_SIZE
    # strides
    stride_k_t, stride_k_h, stride_k_d,
    stride_v_t, stride_v_h, stride_v_d,
    stride_kc_b, stride_kc_o, stride_kc_h, stride_kc_d,
    stride_vc_b, stride_vc_o, stride_vc_h, stride_vc_d,
    # meta-parameters
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # key, value:             [num_tokens, num_kv_heads, head_dim], dtype of the caches
    # key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    # slot_mapping:           [num_tokens], slot = block * BLOCK_SIZE + offset, -1 = skip
    # grid:                   (num_tokens, cdiv(num_kv_heads, BLOCK_H))
    HEAD_DIM_PAD: tl.constexpr = triton.next_power_of_2(HEAD_DIM)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):  # padding (-1), or a slot outside the pool: skipped
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    # int64: a head or dim stride of a large pool (head-major layouts) times the index may
    # pass 2^31
    offs_h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_PAD).to(tl.int64)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]

    k = tl.load(
        key_ptr + token * stride_k_t + offs_h[:, None] * stride_k_h
        + offs_d[None, :] * stride_k_d,
        mask=mask,
    )
    v = tl.load(
        value_ptr + token * stride_v_t + offs_h[:, None] * stride_v_h
        + offs_d[None, :] * stride_v_d,
        mask=mask,
    )
    kc_ptrs = (
        key_cache_ptr + block * stride_kc_b + offset * stride_kc_o
        + offs_h[:, None] * stride_kc_h + offs_d[None, :] * stride_kc_d
    )
    vc_ptrs = (
        value_cache_ptr + block * stride_vc_b + offset * stride_vc_o
        + offs_h[:, None] * stride_vc_h + offs_d[None, :] * stride_vc_d
    )
    tl.store(kc_ptrs, k, mask=mask)
    tl.store(vc_ptrs, v, mask=mask)
# fmt: on


def _keep(config: triton.Config) -> bool:
    return config.kwargs["BLOCK_H"] * 64 >= 32 * config.num_warps  # >= 1 row of 64 per warp


def _prune(configs: list[triton.Config], num_kv_heads: int) -> list[triton.Config]:
    """The configs whose head tile does not exceed the launch's heads (padded)."""
    heads_pad = next_power_of_2(num_kv_heads)
    kept = [c for c in configs if c.kwargs["BLOCK_H"] <= heads_pad]
    return kept or configs[:1]


_NUM_STAGES = 1  # no loop to pipeline
# The space examples/autotune.py sweeps (smallest tiles first: the cheapest under the
# interpreter). Nothing autotunes on the serving path: a launch runs its explicit config, else
# the tuned config of its key, else `_default_config`.
_AUTOTUNE_CONFIGS = list(
    filter(
        _keep,
        [
            triton.Config({"BLOCK_H": block_h}, num_warps=num_warps, num_stages=_NUM_STAGES)
            for block_h in (1, 2, 4, 8)
            for num_warps in (1, 2, 4, 8)
        ],
    )
)
_TUNED_FIELDS = ("block_h", "num_warps")


def candidate_configs(*, num_kv_heads: int) -> list[KernelConfig]:
    """The configs worth trying for launches with `num_kv_heads` heads (what
    examples/autotune.py sweeps): the space pruned for such a launch, with only the fields it
    tunes. Each, set as the tuned config of the launch's key, makes the launcher run exactly
    that config."""
    return [from_triton_config(c, _TUNED_FIELDS) for c in _prune(_AUTOTUNE_CONFIGS, num_kv_heads)]


@functools.lru_cache(maxsize=1024)
def _default_config(num_kv_heads: int, head_dim: int) -> KernelConfig:
    """The shipped default: up to 2048 elements (all heads, if they fit) per program, about 8
    per thread (one 16-byte vector of 16-bit values)."""
    head_dim_pad = next_power_of_2(head_dim)
    block_h = min(next_power_of_2(num_kv_heads), max(1, 2048 // head_dim_pad))
    num_warps = min(8, max(1, block_h * head_dim_pad // 256))
    return KernelConfig(block_h=block_h, num_warps=num_warps)


@functools.lru_cache(maxsize=1024)
def _launch_config(
    config: KernelConfig | None, tuned: KernelConfig | None, num_kv_heads: int, head_dim: int
) -> KernelConfig:
    """The config a launch runs: the explicit one, else the tuned one, else the default; the
    fields it leaves open from the default."""
    chosen = config if config is not None else tuned
    default = _default_config(num_kv_heads, head_dim)
    return default if chosen is None else chosen.merged(default)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str | None = None,
    config: KernelConfig | dict | None = None,
) -> None:
    """Write key/value ``[T, Hkv, D]`` into ``key_cache``/``value_cache``
    ``[num_blocks, block_size, Hkv, D]`` at ``slot_mapping`` ``[T]`` (int64 or int32).

    ``slot = block_id * block_size + offset``; a slot of -1 is skipped (padding). The caches may
    be strided views of a larger pool: every stride is honoured. ``key`` may be of another float
    dtype than the cache (it is cast first, rounding to nearest even). Slots must be distinct.

    Out-of-range slots (below -1, or >= num_blocks * block_size): rejected with a ValueError on
    CPU tensors and on the torch backend; on CUDA (no host sync) the kernel skips them like -1.
    Nothing is ever written outside the caches.
    """
    check_caches(key_cache, value_cache)
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    device = key_cache.device
    check_tensor(
        key, "key", shape=(None, num_kv_heads, head_dim), dtypes=FLOAT_DTYPES, device=device
    )
    num_tokens = key.shape[0]
    check_tensor(
        value,
        "value",
        shape=(num_tokens, num_kv_heads, head_dim),
        dtypes=(key.dtype,),
        device=device,
    )
    check_index_vector(slot_mapping, "slot_mapping", length=num_tokens, device=device)
    if config is not None:
        config = KernelConfig.coerce(config)

    backend = _dispatch.resolve_backend(backend, device)
    _dispatch.record("write_kv", backend)
    num_slots = num_blocks * block_size
    if _checks.checks_values(device, backend):
        _checks.check_ids_in_range(
            slot_mapping,
            "slot_mapping",
            low=-1,
            high=num_slots,
            expected=lambda: (
                f"(expected -1 to skip, or a slot in [0, {num_slots}): "
                f"{num_blocks} blocks of {block_size} slots)"
            ),
        )
    if backend == "torch":
        reference.write_kv(key, value, key_cache, value_cache, slot_mapping)
        return
    if num_tokens == 0:
        return
    if key.dtype != key_cache.dtype:  # cast in torch: round-to-nearest-even, like the reference
        key, value = key.to(key_cache.dtype), value.to(key_cache.dtype)

    tuned = None
    if config is None:
        key_str = config_key(head_dim=head_dim, block_size=block_size, dtype=key_cache.dtype)
        tuned = TUNED.get("write_kv", key_str)
    config = _launch_config(config, tuned, num_kv_heads, head_dim)
    grid = check_grid((num_tokens, cdiv(num_kv_heads, config.block_h)), "write_kv")
    _write_kv_kernel[grid](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        num_kv_heads,
        num_slots,
        *key.stride(),
        *value.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_H=config.block_h,
        num_warps=config.num_warps,
        num_stages=_NUM_STAGES,
    )
