"""Builders shared by the kernel tests, handed out as fixtures (tests import nothing from here).

Every paged problem lives in a NaN-poisoned block-major pool ``[num_blocks, 2, block_size, Hkv,
D]`` (so the per-layer key/value caches are strided views, as in kvcache), with block 0 reserved
as the padding entry of block tables: an op that reads a slot it should not, returns NaN.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagedkv.kernels import reference


@dataclasses.dataclass
class PagedProblem:
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [sum(seq_lens), Hkv, D], packed in sequence order
    value: torch.Tensor
    pool: torch.Tensor  # [num_blocks, 2, block_size, Hkv, D]
    key_cache: torch.Tensor  # pool[:, 0]
    value_cache: torch.Tensor  # pool[:, 1]
    block_tables: torch.Tensor  # [B, max_blocks] int32, padding entries = 0
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor | None  # [B + 1] int32; None for decode
    slot_mapping: torch.Tensor  # [sum(seq_lens)] int64, slots of `key` rows

    @property
    def written(self) -> torch.Tensor:
        """[num_blocks, block_size] bool: slots holding a sequence's keys."""
        mask = torch.zeros(self.pool.shape[0] * self.pool.shape[2], dtype=torch.bool)
        mask[self.slot_mapping] = True
        return mask.view(self.pool.shape[0], self.pool.shape[2])


def make_paged_problem(
    seq_lens: list[int],
    q_lens: list[int] | None,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    *,
    spare_blocks: int = 3,
    seed: int = 0,
) -> PagedProblem:
    """Random K/V written through shuffled block tables; q_lens None = decode (one query each)."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(seq_lens)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + spare_blocks
    max_blocks = max(blocks_per_seq, default=0) + 1  # always one padding column
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int32)
    slots = []
    for i, (seq_len, n) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        row = [ids.pop() for _ in range(n)]
        block_tables[i, :n] = torch.tensor(row, dtype=torch.int32)
        slots += [row[p // block_size] * block_size + p % block_size for p in range(seq_len)]
    slot_mapping = torch.tensor(slots, dtype=torch.int64)

    pool_shape = (num_blocks, 2, block_size, num_kv_heads, head_dim)
    pool = torch.full(pool_shape, float("nan"), dtype=dtype)
    key_cache, value_cache = pool[:, 0], pool[:, 1]
    total = sum(seq_lens)
    key = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    reference.write_kv(key, value, key_cache, value_cache, slot_mapping)

    if q_lens is None:
        num_tokens, query_start_loc = num_seqs, None
    else:
        num_tokens = sum(q_lens)
        query_start_loc = torch.tensor(
            [0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32
        )
    query = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype)
    return PagedProblem(
        query=query,
        key=key,
        value=value,
        pool=pool,
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=query_start_loc,
        slot_mapping=slot_mapping,
    )


@pytest.fixture
def make_paged():
    return make_paged_problem
