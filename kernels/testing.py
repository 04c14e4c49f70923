"""Paged test problems: what the kernel tests, examples/benchmark_kernels.py and
examples/autotune.py run the ops on.

A problem lives in a block-major pool ``[num_blocks, num_layers, 2, block_size, Hkv, D]``, the
layout of kvcache, in layer 0 (its key/value caches are strided views, as in production). Block
tables are shuffled; block 0 is reserved as the padding entry of every table row, and slots no
sequence wrote are NaN when poisoned: an op that reads a slot it should not returns NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch

from . import reference


@dataclasses.dataclass
class PagedProblem:
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [sum(seq_lens), Hkv, D], packed in sequence order
    value: torch.Tensor
    pool: torch.Tensor  # [num_blocks, num_layers, 2, block_size, Hkv, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32, padding entries = 0
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor | None  # [B + 1] int32; None for decode
    slot_mapping: torch.Tensor  # [sum(seq_lens)] int64, slots of `key` rows

    @property
    def key_cache(self) -> torch.Tensor:
        return self.pool[:, 0, 0]  # [num_blocks, block_size, Hkv, D]

    @property
    def value_cache(self) -> torch.Tensor:
        return self.pool[:, 0, 1]

    @property
    def written(self) -> torch.Tensor:
        """[num_blocks, block_size] bool: slots holding a sequence's keys."""
        num_blocks, block_size = self.key_cache.shape[:2]
        mask = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=self.pool.device)
        mask[self.slot_mapping] = True
        return mask.view(num_blocks, block_size)

    def slot_valid(
        self, holes: Mapping[int, Iterable[int]], *, poison: bool = True
    ) -> torch.Tensor:
        """A `paged_attention` slot_valid ``[num_blocks, block_size]`` bool: False at the slots
        of sequence i's positions ``holes[i]``, True elsewhere. With `poison` those slots'
        keys and values become NaN, so an op that reads one returns NaN."""
        num_blocks, block_size = self.key_cache.shape[:2]
        valid = torch.ones(num_blocks, block_size, dtype=torch.bool, device=self.pool.device)
        for seq, positions in holes.items():
            positions = torch.as_tensor(list(positions), dtype=torch.int64)
            blocks = self.block_tables[seq, positions // block_size].long().to(valid.device)
            offsets = (positions % block_size).to(valid.device)
            valid[blocks, offsets] = False
            if poison:
                self.key_cache[blocks, offsets] = float("nan")
                self.value_cache[blocks, offsets] = float("nan")
        return valid


def make_paged_problem(
    seq_lens: list[int],
    q_lens: list[int] | None,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    *,
    device: torch.device | str = "cpu",
    poison: bool = True,
    seed: int = 0,
    spare_blocks: int = 3,
    num_layers: int = 1,
) -> PagedProblem:
    """Random K/V of `seq_lens` tokens written through shuffled block tables (one padding column
    more than the longest sequence needs) into a pool of the blocks they need + 1 (padding) +
    `spare_blocks`; unwritten slots NaN if `poison`, else 0. q_lens None = decode (one query
    per sequence), else sequence i has q_lens[i] queries. Random draws on the CPU from `seed`,
    so a problem is the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(seq_lens)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + spare_blocks
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_tables = torch.zeros(num_seqs, max(blocks_per_seq, default=0) + 1, dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    # slot of each token: its sequence's block for its position, and the offset in that block
    total = sum(seq_lens)
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs), lens)
    positions = torch.arange(total) - (lens.cumsum(0) - lens)[seq_idx]
    slots = block_tables[seq_idx, positions // block_size] * block_size + positions % block_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    key, value = randn(total, num_kv_heads, head_dim), randn(total, num_kv_heads, head_dim)
    if q_lens is None:
        num_tokens, query_start_loc = num_seqs, None
    else:
        num_tokens = sum(q_lens)
        starts = [0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()]
        query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    pool = torch.full(shape, float("nan") if poison else 0.0, dtype=dtype, device=device)
    problem = PagedProblem(
        randn(num_tokens, num_q_heads, head_dim), key, value, pool, block_tables.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device), query_start_loc,
        slots.to(device),
    )  # fmt: skip
    reference.write_kv(key, value, problem.key_cache, problem.value_cache, problem.slot_mapping)
    return problem
