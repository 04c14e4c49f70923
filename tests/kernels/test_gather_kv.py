"""gather_kv through the Triton kernel (interpreted): the exact inverse of write_kv, in tiles of
positions, and launches within CUDA's grid limits for any context length."""

from __future__ import annotations

import importlib

import pytest
import torch

from pagedkv.kernels import gather_kv, reference, trace_backends, write_kv
from pagedkv.kernels._checks import MAX_GRID

gather_module = importlib.import_module("pagedkv.kernels.gather_kv")  # the function shadows it

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

CASES = [
    # seq_lens, Hkv, D, bs, dtype
    pytest.param([1, 16, 21], 2, 64, 8, BF16, id="B3-Hkv2-D64-bs8-bf16"),
    pytest.param([32, 5], 1, 80, 16, F16, id="B2-Hkv1-D80-bs16-fp16"),
    pytest.param([9], 4, 128, 32, F32, id="B1-Hkv4-D128-bs32-fp32"),
    pytest.param([3, 1, 7, 2], 3, 256, 2, BF16, id="B4-Hkv3-D256-bs2-bf16"),
    # tiles of 32 positions (Hkv 2 x D 64): 70 = 2 tiles + 6, 33 = 1 + 1
    pytest.param([70, 5, 33], 2, 64, 16, F16, id="B3-Hkv2-D64-bs16-tile32-remainders"),
    # tiles of 4 positions (Hkv 8 x D 128), an empty sequence between two others
    pytest.param([9, 0, 6], 8, 128, 4, BF16, id="B3-Hkv8-D128-bs4-tile4-empty-middle"),
]


@pytest.mark.parametrize("seq_lens, hkv, d, bs, dtype", CASES)
def test_gather_kv_matches_reference(make_paged, seq_lens, hkv, d, bs, dtype):
    problem = make_paged(seq_lens, None, hkv, hkv, d, bs, dtype)
    with trace_backends() as calls:
        key, value = gather_kv(
            problem.key_cache,
            problem.value_cache,
            problem.block_tables,
            problem.seq_lens,
            backend="triton",
        )
    assert calls == [("gather_kv", "triton")]
    assert torch.equal(key, problem.key) and torch.equal(value, problem.value)  # no NaN read
    ref_key, ref_value = reference.gather_kv(
        problem.key_cache, problem.value_cache, problem.block_tables, problem.seq_lens
    )
    assert torch.equal(key, ref_key) and torch.equal(value, ref_value)


def test_write_then_gather_round_trip(make_paged):
    problem = make_paged([13, 8], None, 2, 2, 64, 8, BF16)
    new_key = torch.randn_like(problem.key, dtype=F32).to(BF16)
    new_value = torch.randn_like(problem.value, dtype=F32).to(BF16)
    write_kv(
        new_key,
        new_value,
        problem.key_cache,
        problem.value_cache,
        problem.slot_mapping,
        backend="triton",
    )
    key, value = gather_kv(
        problem.key_cache,
        problem.value_cache,
        problem.block_tables,
        problem.seq_lens,
        num_tokens=21,
        backend="triton",
    )
    assert torch.equal(key, new_key) and torch.equal(value, new_value)


def test_gather_kv_empty_sequences(make_paged):
    problem = make_paged([0, 5, 0], None, 2, 2, 64, 8, F16)
    key, value = gather_kv(
        problem.key_cache,
        problem.value_cache,
        problem.block_tables,
        problem.seq_lens,
        backend="triton",
    )
    assert torch.equal(key, problem.key) and key.shape == (5, 2, 64)


def test_tiles_hold_about_4096_elements():
    assert gather_module.block_positions(2, 64) == 32
    assert gather_module.block_positions(8, 128) == 4
    assert gather_module.block_positions(3, 80) == 8  # padded: 4 heads x 128
    assert gather_module.block_positions(32, 256) == 1
    assert gather_module.block_positions(1, 16) == 64  # at most 64 positions


@pytest.mark.parametrize(
    "num_seqs, max_positions, block_p",
    [
        pytest.param(1, 1 << 20, 1, id="1-seq-1M-tile1"),
        pytest.param(64, 1 << 20, 4, id="64-seqs-1M-tile4"),
        pytest.param(100_000, 1 << 20, 1, id="100k-seqs-1M-tile1"),
        pytest.param(3, 70_000, 64, id="3-seqs-70k"),
    ],
)
def test_launch_grids_within_cuda_limits(num_seqs, max_positions, block_p):
    """Tiles of positions on axis 0 (limit 2^31 - 1), sequences on axis 1 (limit 65,535 per
    launch): every (sequence, tile) is covered once, whatever the context length."""
    launches = gather_module.launch_grids(num_seqs, max_positions, block_p)
    covered = 0
    for first, grid in launches:
        assert first == covered
        assert all(size <= limit for size, limit in zip(grid, MAX_GRID, strict=False)), grid
        assert grid[0] * block_p >= max_positions > (grid[0] - 1) * block_p
        covered += grid[1]
    assert covered == num_seqs


class _GridSpy:
    """Stands in for the kernel: records each launch's grid and meta-parameters, runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((grid, args, meta))


def test_launcher_grid_for_a_1m_token_context(monkeypatch):
    """A sequence of 2^20 tokens (past the 65,535 a (sequence, position) grid allowed) launches
    within CUDA's limits; tiny tensors: one block of a one-dim head, read 65,536 times."""
    spy = _GridSpy()
    monkeypatch.setattr(gather_module, "_gather_kv_kernel", spy)
    cache = torch.zeros(1, 16, 1, 1, dtype=F16)
    tables = torch.zeros(1, 1 << 16, dtype=torch.int32)
    seq_lens = torch.tensor([1 << 20], dtype=torch.int32)
    key, _ = gather_kv(cache, cache, tables, seq_lens, backend="triton")
    assert key.shape == (1 << 20, 1, 1)
    ((grid, args, meta),) = spy.launches
    assert all(size <= limit for size, limit in zip(grid, MAX_GRID, strict=False)), grid
    assert grid[1] == 1 and grid[0] * meta["BLOCK_P"] >= 1 << 20


def test_more_sequences_than_one_launch_holds(make_paged, monkeypatch):
    """Past the sequences one launch holds (65,535 on CUDA; 2 here), the gather takes several
    launches, each from its first sequence on: same result."""
    monkeypatch.setattr(gather_module, "MAX_GRID", (MAX_GRID[0], 2, MAX_GRID[2]))
    problem = make_paged([5, 17, 0, 9, 3], None, 2, 2, 64, 8, BF16)
    key, value = gather_kv(
        problem.key_cache,
        problem.value_cache,
        problem.block_tables,
        problem.seq_lens,
        backend="triton",
    )
    assert torch.equal(key, problem.key) and torch.equal(value, problem.value)
