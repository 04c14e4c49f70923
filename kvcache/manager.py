"""`KVCacheManager`: the one object users hold.

A facade over the pieces of the core: it validates every argument, then lets the block pool
(`allocator`), the sequence registry (`sequences`), the forward step (`step`) and the CPU swap
space (`swap`) do the work, and counts what happened.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch

from . import _checks, display
from .allocator import KVCacheAllocator
from .block_table import KVCacheBlocks
from .config import KVCacheConfig
from .paged_cache import PagedKVCache
from .prefix import PrefixChain, lookup_prefix
from .sequences import SHORTAGE_HINT, SeqState, Sequences
from .stats import GroupStats, KVCacheStats
from .step import Step
from .swap import SwapSpace

__all__ = ["KVCacheManager"]


class KVCacheManager:
    """Paged KV cache for many sequences: allocation, forward steps, sharing, swapping, stats.

    One forward for a batch of sequences::

        mgr = KVCacheManager(KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=256))
        cached = mgr.allocate("a", prompt_ids)       # prefix-cache hit: tokens already stored
        with mgr.step(["a"], len(prompt_ids) - cached, token_ids=[prompt_ids[cached:]]) as step:
            for layer in range(2):
                step.write(layer, k, v)              # this step's K/V
                out = step.attend(layer, q, scale=64**-0.5)
        # committed: the prompt's full blocks are now in the prefix cache

    Sequence ids are any hashable. Every method that gets bad input raises `ValueError` and
    changes nothing; running out of blocks raises `OutOfBlocksError` and changes nothing.
    """

    def __init__(self, config: KVCacheConfig) -> None:
        if not isinstance(config, KVCacheConfig):
            raise ValueError(f"config must be a KVCacheConfig; got {type(config).__name__}")
        self.config = config
        self.block_size = config.block_size
        self.cache = PagedKVCache(config)
        # one block pool per KV cache group, their bytes held counted together
        self._gauge, self.allocators = KVCacheAllocator.pools(config)
        self._seqs = Sequences(self.allocators, self.cache)
        self._swap = SwapSpace(self.cache, config.num_cpu_blocks)
        self._prefix_queries = 0
        self._prefix_hits = 0

    # ---- lookups --------------------------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        try:
            return seq_id in self._seqs or seq_id in self._swap
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Hashable]:
        """Every sequence id: resident ones, then swapped-out ones."""
        return iter(self._seqs.ids() + self._swap.ids())

    @property
    def seq_ids(self) -> list[Hashable]:
        """Sequences resident on the device (swapped-out ones are in `swapped_seq_ids`)."""
        return self._seqs.ids()

    @property
    def swapped_seq_ids(self) -> list[Hashable]:
        return self._swap.ids()

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, every group together."""
        return sum(a.num_free_blocks for a in self.allocators)

    @property
    def num_used_blocks(self) -> int:
        """Blocks in use, every group together."""
        return sum(a.num_used_blocks for a in self.allocators)

    @property
    def used_bytes(self) -> int:
        """KV bytes held: each group's blocks in use x its bytes per block."""
        return self._gauge.used_bytes

    def seq_len(self, seq_id: Hashable) -> int:
        if seq_id in self._swap:
            return self._swap.get(seq_id).num_tokens
        return int(self._seqs.lengths[self._get(seq_id).row])

    def get_blocks(self, seq_id: Hashable, group: int = 0) -> KVCacheBlocks:
        """The sequence's `KVCacheBlocks` in a KV cache group (its block-table row)."""
        return self._get(seq_id).blocks[group]

    def token_ids(self, seq_id: Hashable) -> list[int]:
        """The token ids the manager knows of the sequence's first positions (a declared
        prompt may run past its length)."""
        return self._seqs.tokens.known(self._get(seq_id).row)

    def block_tables(self, seq_ids: Sequence[Hashable], group: int = 0) -> torch.Tensor:
        """`[len(seq_ids), max_blocks]` int32 on the cache device, of one KV cache group;
        padding entries are 0, entries a sliding window released are -1."""
        rows = self._seqs.rows([self._get(s) for s in seq_ids])
        table = self._seqs.groups[group].table
        return torch.from_numpy(table.tables(rows)).to(self.cache.device)

    def seq_lens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """`[len(seq_ids)]` int32 token counts on the cache device."""
        rows = self._seqs.rows([self._get(s) for s in seq_ids])
        lens = self._seqs.lengths[rows].astype(np.int32)
        return torch.from_numpy(lens).to(self.cache.device)

    def _get(self, seq_id: Hashable) -> SeqState:
        try:
            state = self._seqs.find(seq_id)
        except TypeError:
            raise ValueError(f"sequence id {seq_id!r} is not hashable") from None
        if state is not None:
            return state
        if seq_id in self._swap:
            raise ValueError(f"sequence {seq_id!r} is swapped out; call swap_in({seq_id!r}) first")
        raise ValueError(
            f"unknown sequence id {seq_id!r}: not allocated, or already freed "
            f"({len(self._seqs)} sequences are live)"
        )

    def _get_free(self, seq_ids: Sequence[Hashable], what: str) -> list[SeqState]:
        """Distinct live sequences that no open step holds."""
        states = self._seqs.find_many(seq_ids)
        if states is None:
            states = [self._get(s) for s in seq_ids]  # raises the precise error
        if len(set(map(id, states))) != len(states):
            raise ValueError(f"duplicate sequence ids in {list(seq_ids)!r}")
        held = self._seqs.in_step(states)
        if held:
            raise ValueError(
                f"cannot {what} sequence {held[0].seq_id!r}: an open step holds it; commit or "
                "abort that step first"
            )
        return states

    def _check_new_id(self, seq_id: Hashable, what: str) -> None:
        _checks.check_hashable(seq_id, "sequence id")
        if seq_id in self:
            raise ValueError(f"cannot {what} {seq_id!r}: that sequence id is already allocated")

    # ---- sequences ------------------------------------------------------------------------
    def allocate(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int] | None = None,
        *,
        extra_key: Hashable = None,
    ) -> int:
        """Start a sequence. With `token_ids` (its prompt), reuse the longest cached prefix.

        Returns the number of prompt tokens already in the cache (the sequence's length now);
        at least one token is always left to compute, so the model has a query to run. Steps
        that append the rest without ids continue the declared prompt; ids they pass must
        agree with it.
        """
        self._check_new_id(seq_id, "allocate")
        ids = [] if token_ids is None else _checks.as_token_list(token_ids)
        _checks.check_hashable(extra_key, "extra_key")
        hits, keys, stored_from = [[] for _ in self.allocators], [], None
        if ids and self.config.enable_prefix_caching:
            windows = [g.window for g in self.config.groups]
            hits, keys, stored_from = lookup_prefix(
                self.allocators, windows, ids, self.block_size, extra_key
            )
            self._prefix_queries += len(ids)
            self._prefix_hits += len(keys) * self.block_size
        for allocator, held in zip(self.allocators, hits, strict=True):
            allocator.touch(held)
        cached = len(keys) * self.block_size
        self._seqs.add(seq_id, hits, cached, PrefixChain(keys, extra_key), ids, stored_from)
        return cached

    def cached_prefix(
        self, token_ids: Sequence[int], *, extra_key: Hashable = None
    ) -> tuple[int, list[int]]:
        """What `allocate(seq_id, token_ids)` would find, without taking anything: the number
        of prompt tokens cached, and per group how many of the blocks holding them are free now
        (allocating takes them off the free queue)."""
        ids = _checks.as_token_list(token_ids)
        _checks.check_hashable(extra_key, "extra_key")
        if not ids or not self.config.enable_prefix_caching:
            return 0, [0] * len(self.allocators)
        windows = [g.window for g in self.config.groups]
        hits, keys, _ = lookup_prefix(self.allocators, windows, ids, self.block_size, extra_key)
        return len(keys) * self.block_size, [sum(b.ref_count == 0 for b in h) for h in hits]

    def step(
        self,
        seq_ids: Sequence[Hashable],
        num_tokens: int | Sequence[int] = 1,
        *,
        token_ids: Sequence[Sequence[int]] | torch.Tensor | None = None,
        valid: Sequence[Sequence[bool]] | torch.Tensor | None = None,
        num_queries: int | None = None,
        forks: Sequence[Sequence[Hashable]] | None = None,
        keep: int | None = None,
    ) -> Step:
        """Plan one forward: append `num_tokens` tokens (one count, or one per sequence, 0
        allowed) to each sequence, then fork `forks[i]` (new ids) off sequence i.

        `token_ids[i]` are sequence i's new tokens (known ids let full blocks join the prefix
        cache). `valid[i][j]` False stores token j but hides it from every query (a pad inside
        a padded batch; its sequence's blocks stop joining the prefix cache). With
        `num_queries`, each row of the forward has that many queries, its new tokens the last
        of them (padded batches); otherwise a row's queries are its new tokens.
        `keep`: how many of the last tokens a later `truncate` may drop, on a model with
        sliding windows, which keep only what queries after the shortest such crop see. By
        default, a crop back into this step if it has at most `CROP_STEP` (64) tokens, none
        into a longer one; assisted decoding, whose candidates may span steps, passes more.
        All or nothing (`OutOfBlocksError`, `ValueError`: nothing changed). Returns an open
        `Step`: commit it when the forward succeeded, abort it otherwise (or use `with`).
        """
        states = self._get_free(seq_ids, "step")
        if not states:
            raise ValueError("a step needs at least one sequence; got none")
        new, (row_of, index), ids, flags, unknown = _checks.step_inputs(
            num_tokens, len(states), token_ids, valid, num_queries, keep
        )
        rows = self._seqs.rows(states)
        if ids is not None:
            self._seqs.check_agrees(states, rows, row_of, index, ids, unknown)
        if forks is not None:
            forks = _checks.as_forks(forks, len(states))
            for child in (c for f in forks for c in f):
                self._check_new_id(child, "fork into")
        growth = self._seqs.grow(states, rows, new, (row_of, index, ids, unknown), forks, keep)
        try:
            return Step(self._seqs, growth, self.cache, num_queries, flags)
        except BaseException:
            self._seqs.undo(growth)
            raise

    def append(
        self, seq_id: Hashable, num_tokens: int, token_ids: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Reserve and commit at once `num_tokens` slots of one sequence; returns their slot
        mapping (int64 on the cache device). The caller writes them before anything reads
        them (full blocks are registered now); `step` is the way that can be undone."""
        _checks.check_count("num_tokens", num_tokens)
        ids = None if token_ids is None else [token_ids]
        step = self.step([seq_id], num_tokens, token_ids=ids)
        step.commit()
        return step.slot_mapping

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start `child_id` as a copy of `parent_id` that shares all its blocks."""
        (parent,) = self._get_free([parent_id], "fork")
        self._check_new_id(child_id, "fork into")
        self._seqs.fork(parent, child_id)

    def reorder(self, seq_ids: Sequence[Hashable], src_indices: Sequence[int]) -> None:
        """Beam search: `seq_ids[i]` becomes a copy of `seq_ids[src_indices[i]]`, sharing blocks.

        Only ref counts change; a shared last block is copied later, by the step writing it.
        """
        states = self._get_free(seq_ids, "reorder")
        self._seqs.reorder(states, _checks.as_sources(src_indices, len(states)))

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens (assisted decoding rejects drafts this way).

        Dropped full blocks that are registered stay findable in the prefix cache.
        """
        (state,) = self._get_free([seq_id], "truncate")
        _checks.check_position(
            num_tokens, int(self._seqs.lengths[state.row]), f"cannot truncate {seq_id!r} to"
        )
        self._seqs.check_truncate(state, int(num_tokens))
        self._seqs.truncate(state, int(num_tokens))

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence (resident or swapped out). Its registered blocks stay cached."""
        if seq_id in self._swap:
            self._swap.discard(seq_id)
            return
        (state,) = self._get_free([seq_id], "free")
        self._seqs.remove(state)

    def swap_out(self, seq_id: Hashable) -> None:
        """Move a sequence's blocks to the CPU swap space and free its device blocks."""
        (state,) = self._get_free([seq_id], "swap out")
        tokens = self._seqs.tokens.known(state.row)
        self._swap.store(seq_id, state.blocks, tokens, state.chain.extra_key)
        self._seqs.remove(state)

    def swap_in(self, seq_id: Hashable) -> None:
        """Bring a swapped-out sequence back into fresh device blocks."""
        if seq_id not in self._swap:
            if seq_id in self:
                raise ValueError(f"sequence {seq_id!r} is not swapped out")
            self._get(seq_id)  # unknown id: raises
        blocks, swapped = self._swap.load(seq_id, self.allocators, SHORTAGE_HINT)
        chain = PrefixChain((), swapped.extra_key)  # new blocks: keyed and registered afresh
        state = self._seqs.add(
            seq_id, blocks, swapped.num_tokens, chain, swapped.token_ids, swapped.stored_from
        )
        self._seqs.register_full_blocks(state)

    # ---- prefix cache / stats -------------------------------------------------------------
    def reset_peak_usage(self) -> None:
        """Measure the peaks (`stats`, `peak_used_bytes`) from now on (e.g. around one
        generate call)."""
        for allocator in self.allocators:
            allocator.reset_peak()
        self._gauge.reset_peak()

    @property
    def peak_used_bytes(self) -> int:
        """The most KV bytes held at once (every group), since creation or the last reset."""
        return self._gauge.peak_bytes

    def reset_prefix_cache(self) -> int:
        """Forget every registered prefix (data in use is kept). Returns blocks forgotten."""
        n = sum(a.reset_prefix_cache() for a in self.allocators)
        self._seqs.reset_keys()
        return n

    @property
    def stats(self) -> KVCacheStats:
        return KVCacheStats.of(
            GroupStats.of_pools(self.config, self.allocators),
            num_seqs=len(self._seqs),
            num_swapped_seqs=len(self._swap),
            prefix_queries=self._prefix_queries,
            prefix_hits=self._prefix_hits,
            swapped_out_blocks=self._swap.blocks_out,
            swapped_in_blocks=self._swap.blocks_in,
            cow_copies=self._seqs.cow_copies,
            peak_used_bytes=self._gauge.peak_bytes,
        )

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (used by tests; O(blocks)): every block is
        free or held, ref counts = holders, free + used = total, CPU blocks likewise."""
        for g, allocator in enumerate(self.allocators):
            allocator.check_invariants(self._seqs.holders(g))
        self._swap.check_invariants()
        self._gauge.check_invariants(self.allocators)

    # ---- display --------------------------------------------------------------------------
    def __repr__(self) -> str:
        return display.summary(self)

    def block_map(self) -> list[dict]:
        """Per block: state ('free', 'cached', 'used', 'shared'), ref count, owners, tokens."""
        return display.block_map(self)

    def _repr_html_(self) -> str:
        return display.block_map_html(self)
