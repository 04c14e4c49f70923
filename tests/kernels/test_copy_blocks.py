"""copy_blocks through the Triton kernel (interpreted): every layer in one launch, for the
block-major pool (base pointer + layer stride) and for separate tensors (pointer table)."""

from __future__ import annotations

import importlib

import pytest
import torch

from pagedkv.kernels import copy_blocks, reference, trace_backends
from pagedkv.kernels.copy_blocks import _layer_stride

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def make_layers(layout, num_layers, num_blocks, bs, hkv, d, dtype):
    gen = torch.Generator().manual_seed(num_layers * 7 + bs)
    if layout == "pool":
        pool = torch.randn(num_blocks, num_layers, 2, bs, hkv, d, generator=gen).to(dtype)
        layers = range(num_layers)
        return [pool[:, i, 0] for i in layers], [pool[:, i, 1] for i in layers]
    if layout == "head-major":  # [num_blocks, Hkv, bs, D] storage: block rows are not flat
        shape = (num_blocks, hkv, bs, d)
        keys = [
            torch.randn(shape, generator=gen).to(dtype).transpose(1, 2) for _ in range(num_layers)
        ]
        values = [torch.randn(shape, generator=gen).to(dtype).transpose(1, 2) for _ in keys]
        return keys, values
    keys = [torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype) for _ in range(num_layers)]
    values = [torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype) for _ in keys]
    return keys, values


CASES = [
    # layout, num_layers, num_blocks, bs, Hkv, D, dtype
    pytest.param("pool", 4, 8, 16, 2, 64, BF16, id="pool-L4-bs16-Hkv2-D64-bf16"),
    pytest.param("pool", 1, 5, 8, 3, 80, F32, id="pool-L1-bs8-Hkv3-D80-fp32"),
    pytest.param("pool", 3, 6, 32, 1, 128, F16, id="pool-L3-bs32-Hkv1-D128-fp16"),
    pytest.param("separate", 3, 6, 16, 2, 96, BF16, id="separate-L3-bs16-D96-bf16"),
    pytest.param("separate", 2, 4, 8, 4, 256, F16, id="separate-L2-bs8-D256-fp16"),
    pytest.param("head-major", 3, 5, 8, 3, 80, BF16, id="head-major-L3-bs8-Hkv3-D80-rowwise"),
    pytest.param("pool", 2, 4, 64, 8, 128, F16, id="pool-L2-bs64-Hkv8-D128-multichunk"),
]


@pytest.mark.parametrize("layout, num_layers, num_blocks, bs, hkv, d, dtype", CASES)
def test_copy_blocks_matches_reference(layout, num_layers, num_blocks, bs, hkv, d, dtype):
    keys, values = make_layers(layout, num_layers, num_blocks, bs, hkv, d, dtype)
    expected_k, expected_v = [k.clone() for k in keys], [v.clone() for v in values]
    mapping = torch.tensor([[1, num_blocks - 1], [0, 2]][: max(1, num_blocks // 4)])
    reference.copy_blocks(expected_k, expected_v, mapping)
    with trace_backends() as calls:
        copy_blocks(keys, values, mapping, backend="triton")
    assert calls == [("copy_blocks", "triton")]
    for got, want in zip(keys + values, expected_k + expected_v, strict=True):
        assert torch.equal(got, want)


def test_pool_layout_is_one_base_pointer_and_layer_stride():
    keys, values = make_layers("pool", 4, 8, 16, 2, 64, BF16)
    assert _layer_stride(keys) == 2 * 16 * 2 * 64
    assert _layer_stride(values) == 2 * 16 * 2 * 64
    separate, _ = make_layers("separate", 3, 4, 8, 2, 64, BF16)
    assert _layer_stride(separate) is None


def test_pool_case_is_a_single_launch(monkeypatch):
    """All layers of the pool go through one kernel launch, without a pointer table."""
    module = importlib.import_module("pagedkv.kernels.copy_blocks")  # the function shadows it
    launches = []
    kernel = module._copy_blocks_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs["USE_PTR_TABLE"]))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "_copy_blocks_kernel", Spy())
    keys, values = make_layers("pool", 5, 6, 8, 2, 64, F16)
    copy_blocks(keys, values, torch.tensor([[1, 4], [2, 5]]), backend="triton")
    assert launches == [((2, 5, 1), False)]  # 8 x 2 x 64 = 1024 elements: one flat chunk
    keys, values = make_layers("separate", 3, 6, 8, 2, 64, F16)
    copy_blocks(keys, values, torch.tensor([[1, 4]]), backend="triton")
    assert launches[1] == ((1, 3, 1), True)
    keys, values = make_layers("head-major", 2, 6, 8, 2, 64, F16)
    copy_blocks(keys, values, torch.tensor([[1, 4]]), backend="triton")
    assert launches[2] == ((1, 2, 8), True)  # row by row


def test_copy_blocks_leaves_other_blocks_untouched():
    pool = torch.full((6, 2, 2, 8, 2, 64), float("nan"), dtype=BF16)
    pool[1] = 1.0
    pool[3] = 3.0
    keys, values = [pool[:, i, 0] for i in range(2)], [pool[:, i, 1] for i in range(2)]
    copy_blocks(keys, values, torch.tensor([[1, 2], [3, 5]], dtype=torch.int32), backend="triton")
    assert (pool[2] == 1.0).all() and (pool[5] == 3.0).all()
    assert pool[[0, 4]].isnan().all()


def test_copy_blocks_empty_mapping():
    keys, values = make_layers("pool", 2, 4, 8, 2, 64, F32)
    before = [k.clone() for k in keys]
    copy_blocks(keys, values, torch.zeros(0, 2, dtype=torch.int64), backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(keys, before, strict=True))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_stacked_layers_match_reference(backend):
    """Each cache given as one tensor [num_blocks, num_layers, block_size, Hkv, D] (the K or V
    half of the pool): the same copies as the per-layer lists, in one launch."""
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(6, 3, 2, 8, 2, 64, generator=gen).to(BF16)
    expected = pool.clone()
    mapping = torch.tensor([[1, 4], [2, 5]], dtype=torch.int32)
    layers = range(3)
    reference.copy_blocks(
        [expected[:, i, 0] for i in layers], [expected[:, i, 1] for i in layers], mapping
    )
    with trace_backends() as calls:
        copy_blocks(pool[:, :, 0], pool[:, :, 1], mapping, backend=backend)
    assert calls == [("copy_blocks", backend)]
    assert torch.equal(pool, expected)


def test_stacked_layers_are_one_launch_from_one_base(monkeypatch):
    module = importlib.import_module("pagedkv.kernels.copy_blocks")
    launches = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(module, "_copy_blocks_kernel", Spy())
    pool = torch.zeros(6, 4, 2, 8, 2, 64, dtype=F16)
    copy_blocks(pool[:, :, 0], pool[:, :, 1], torch.tensor([[1, 4]]), backend="triton")
    ((grid, args, kwargs),) = launches
    assert grid == (1, 4, 1) and not kwargs["USE_PTR_TABLE"] and kwargs["FLAT"]
    layer_stride = pool.stride(1)
    assert args[8:10] == (layer_stride, layer_stride)  # key / value step between layers


def test_copy_blocks_grid_within_cuda_limits():
    """Row by row, a block of more than 65,535 rows would pass CUDA's z-limit: refused with a
    ValueError naming the grid, not a failed launch (a flat block is 4096-element chunks)."""
    head_major = torch.zeros(2, 2, 70_000, 1, dtype=F16).transpose(1, 2)  # not flat
    with pytest.raises(ValueError, match=r"copy_blocks would launch a grid of \(1, 1, 70000\)"):
        copy_blocks([head_major], [head_major], torch.tensor([[0, 1]]), backend="triton")
