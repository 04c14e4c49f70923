"""Paged test problems: what the kernel tests, examples/benchmark_kernels.py and
examples/autotune.py run the ops on, and the float64 attention oracle the tests hold them to.

A problem lives in a block-major pool ``[num_blocks, num_layers, 2, block_size, Hkv, D]``, the
layout of kvcache, in layer 0 (its key/value caches are strided views, as in production). Block
tables are shuffled; block 0 is reserved as the padding entry of every table row, and slots no
sequence wrote are NaN when poisoned: an op that reads a slot it should not returns NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import reference
from .attention import paged_attention


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
    def q_lens(self) -> list[int]:
        """Queries per sequence (1 each for decode)."""
        if self.query_start_loc is None:
            return [1] * self.seq_lens.shape[0]
        starts = self.query_start_loc.tolist()
        return [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]

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

    def attend(self, backend: str, **kwargs: Any) -> torch.Tensor:
        """`paged_attention` of this problem on `backend` ("triton", "torch"), or with "float64"
        the torch reference on float64 copies of the query and caches (`config` dropped).
        scale defaults to head_dim ** -0.5."""
        kwargs.setdefault("scale", self.query.shape[-1] ** -0.5)
        inputs = (self.query, self.key_cache, self.value_cache)
        if backend == "float64":
            kwargs.pop("config", None)
            op = reference.paged_attention
            inputs = tuple(t.double() for t in inputs)
        else:
            op = functools.partial(paged_attention, backend=backend)
        return op(*inputs, self.block_tables, self.seq_lens,
                  query_start_loc=self.query_start_loc, **kwargs)  # fmt: skip

    def release_out_of_window(self, sliding_window: int, *, fill: int = -1) -> int:
        """Release what a sliding KV group of window `sliding_window` would: each block of a
        sequence that lies wholly before the window of its first query (position
        seq_len - q_len) becomes NaN in both caches, and its block-table entry `fill` (-1:
        absent). Returns how many entries were released."""
        block_size = self.key_cache.shape[1]
        released = 0
        for seq, (seq_len, q_len) in enumerate(zip(self.seq_lens.tolist(), self.q_lens)):
            lowest_key = max(seq_len - q_len - sliding_window + 1, 0)  # seen by some query
            for col in range(min(lowest_key // block_size, -(-seq_len // block_size))):
                block = int(self.block_tables[seq, col])
                self.key_cache[block] = float("nan")
                self.value_cache[block] = float("nan")
                self.block_tables[seq, col] = fill
                released += 1
        return released


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


def oracle_attention(
    problem: PagedProblem,
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    slot_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive float64 paged attention, one sequence, query and head at a time, reading K/V from
    the packed `problem.key`/`problem.value` (never the cache or the block tables).
    `slot_valid` is mapped to the packed keys through `problem.slot_mapping`. `sinks` as in
    transformers' gpt-oss eager attention: the sink's logit is a last column of the scores,
    the softmax runs over the row, and that column is dropped. A query that sees no key
    outputs 0 (with sinks, what the formula gives)."""
    key_ok = None if slot_valid is None else slot_valid.flatten()[problem.slot_mapping].tolist()
    seq_lens, q_lens = problem.seq_lens.tolist(), problem.q_lens
    q_starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    num_q_heads, num_kv_heads = problem.query.shape[1], problem.key.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(problem.query.shape, dtype=torch.float64)
    k_start = 0
    for seq_len, q_start, q_len in zip(seq_lens, q_starts, q_lens, strict=True):
        keys = problem.key[k_start : k_start + seq_len].double().cpu()
        values = problem.value[k_start : k_start + seq_len].double().cpu()
        for j in range(q_len):
            pos = seq_len - q_len + j
            visible = torch.tensor(
                [
                    (not causal or k <= pos)
                    and (sliding_window is None or pos - k < sliding_window)
                    and (key_ok is None or key_ok[k_start + k])
                    for k in range(seq_len)
                ],
                dtype=torch.bool,
            )
            if sinks is None and not visible.any():
                continue  # stays 0
            for h in range(num_q_heads):
                q = problem.query[q_start + j, h].double().cpu()
                scores = keys[:, h // group] @ q * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                scores = scores.masked_fill(~visible, float("-inf"))
                if sinks is None:
                    probs = torch.softmax(scores, 0)
                else:
                    sink = sinks[h].double().cpu().reshape(1)
                    probs = torch.softmax(torch.cat([scores, sink]), 0)[:-1]
                out[q_start + j, h] = probs @ values[:, h // group]
        k_start += seq_len
    return out
