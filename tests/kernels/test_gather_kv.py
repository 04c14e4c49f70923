"""gather_kv through the Triton kernel (interpreted): the exact inverse of write_kv."""

from __future__ import annotations

import pytest
import torch

from pagedkv.kernels import gather_kv, reference, trace_backends, write_kv

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

CASES = [
    # seq_lens, Hkv, D, bs, dtype
    pytest.param([1, 16, 21], 2, 64, 8, BF16, id="B3-Hkv2-D64-bs8-bf16"),
    pytest.param([32, 5], 1, 80, 16, F16, id="B2-Hkv1-D80-bs16-fp16"),
    pytest.param([9], 4, 128, 32, F32, id="B1-Hkv4-D128-bs32-fp32"),
    pytest.param([3, 1, 7, 2], 3, 256, 2, BF16, id="B4-Hkv3-D256-bs2-bf16"),
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
