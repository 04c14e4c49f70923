"""write_kv through the Triton kernel (interpreted): exact match with the reference, strided
pool views, padding slots, NaN-poisoned caches untouched outside the written slots."""

from __future__ import annotations

import importlib

import pytest
import torch

from pagedkv.kernels import reference, trace_backends, write_kv

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

CASES = [
    # num_tokens, Hkv, D, bs, num_blocks, num_layers, dtype
    pytest.param(17, 2, 64, 16, 5, 1, BF16, id="T17-Hkv2-D64-bs16-bf16"),
    pytest.param(9, 8, 128, 8, 4, 3, F16, id="T9-Hkv8-D128-bs8-3layers-fp16"),
    pytest.param(5, 1, 80, 32, 2, 2, F32, id="T5-Hkv1-D80-bs32-fp32"),
    pytest.param(6, 3, 96, 16, 3, 1, BF16, id="T6-Hkv3-D96-bs16-bf16"),
    pytest.param(4, 2, 256, 1, 8, 2, BF16, id="T4-Hkv2-D256-bs1-bf16"),
    pytest.param(33, 4, 64, 128, 1, 1, F16, id="T33-Hkv4-D64-bs128"),
]


@pytest.mark.parametrize("num_tokens, hkv, d, bs, num_blocks, num_layers, dtype", CASES)
def test_write_kv_matches_reference(num_tokens, hkv, d, bs, num_blocks, num_layers, dtype):
    gen = torch.Generator().manual_seed(num_tokens)
    # block-major pool, as in kvcache: per-layer caches are strided views
    pool = torch.full((num_blocks, num_layers, 2, bs, hkv, d), float("nan"), dtype=dtype)
    expected = pool.clone()
    layer = num_layers - 1
    key = torch.randn(num_tokens, hkv, d, generator=gen).to(dtype)
    value = torch.randn(num_tokens, hkv, d, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:num_tokens]
    slots[::3] = -1  # padding tokens
    with trace_backends() as calls:
        write_kv(key, value, pool[:, layer, 0], pool[:, layer, 1], slots, backend="triton")
    assert calls == [("write_kv", "triton")]
    reference.write_kv(key, value, expected[:, layer, 0], expected[:, layer, 1], slots)
    assert torch.equal(pool.isnan(), expected.isnan()), "a slot outside slot_mapping was written"
    assert torch.equal(pool.nan_to_num(), expected.nan_to_num())
    written = slots[slots >= 0]
    got = pool[:, layer, 0].flatten(0, 1)[written]
    assert torch.equal(got, key[slots >= 0])


def test_write_kv_int32_slots_and_strided_key():
    cache = torch.full((4, 8, 2, 64), float("nan"), dtype=BF16)
    values = torch.full_like(cache, float("nan"))
    packed = torch.randn(5, 2, 2, 64).to(BF16)  # [T, k|v, Hkv, D]: key/value strided views
    slots = torch.tensor([3, 8, -1, 31, 16], dtype=torch.int32)
    write_kv(packed[:, 0], packed[:, 1], cache, values, slots, backend="triton")
    flat_k, flat_v = cache.flatten(0, 1), values.flatten(0, 1)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], packed[t, 0])
            assert torch.equal(flat_v[slot], packed[t, 1])
    assert flat_k.isnan().all(-1).all(-1).sum() == 32 - 4


def test_write_kv_casts_to_cache_dtype():
    cache = torch.zeros(2, 8, 2, 64, dtype=BF16)
    expected = cache.clone()
    key = torch.randn(3, 2, 64)
    slots = torch.tensor([0, 9, 15])
    write_kv(key, key, cache, cache, slots, backend="triton")
    reference.write_kv(key, key, expected, expected, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize(
    "config", [{"block_h": 1, "num_warps": 1}, {"block_h": 4}], ids=["bh1-w1", "bh4"]
)
def test_write_kv_explicit_config(config):
    cache = torch.full((3, 16, 6, 64), float("nan"), dtype=F16)
    values = cache.clone()
    key = torch.randn(7, 6, 64).to(F16)
    slots = torch.tensor([0, 5, 17, 47, -1, 20, 33])
    write_kv(key, key, cache, values, slots, backend="triton", config=config)
    keep = slots >= 0
    assert torch.equal(cache.flatten(0, 1)[slots[keep]], key[keep])
    assert torch.equal(values.flatten(0, 1)[slots[keep]], key[keep])


def test_write_kv_empty():
    cache = torch.full((2, 8, 2, 64), float("nan"))
    write_kv(
        torch.empty(0, 2, 64),
        torch.empty(0, 2, 64),
        cache,
        cache,
        torch.empty(0).long(),
        backend="triton",
    )
    assert cache.isnan().all()


def test_write_kv_grid_within_cuda_limits(monkeypatch):
    """One program per token on axis 0 (limit 2^31 - 1) and per tile of heads on axis 1 (limit
    65,535): the default tile keeps axis 1 small for any head count; a config that would pass
    the limit is a ValueError naming the grid, not a failed launch."""
    module = importlib.import_module("pagedkv.kernels.write_kv")  # the function shadows it
    grids = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **meta: grids.append(grid)

    monkeypatch.setattr(module, "_write_kv_kernel", Spy())
    heads = 70_000  # one-dim heads: tiny tensors
    cache = torch.zeros(1, 2, heads, 1, dtype=F16)
    key = torch.zeros(2, heads, 1, dtype=F16)
    write_kv(key, key, cache, cache, torch.tensor([0, 1]), backend="triton")
    ((tokens, head_tiles),) = grids
    assert tokens == 2 and head_tiles <= 65535
    with pytest.raises(ValueError, match=r"write_kv would launch a grid of \(2, 70000\) programs"):
        write_kv(
            key, key, cache, cache, torch.tensor([0, 1]), backend="triton", config={"block_h": 1}
        )
