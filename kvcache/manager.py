"""`KVCacheManager`: the one object users hold.

It maps sequence ids to blocks (block tables), hands out slots for new tokens, shares blocks
between sequences (prefix cache, fork, beam reorder) with copy-on-write, swaps sequences to CPU
and back, and counts what happened.
"""

from __future__ import annotations

import html
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .allocator import BlockHash, KVCacheAllocator, OutOfBlocksError, hash_block_tokens
from .block import BlockTable, KVCacheBlocks
from .config import KVCacheConfig
from .paged_cache import PagedKVCache
from .transfer import KVCacheTransfer

__all__ = ["KVCacheManager", "KVCacheStats"]


@dataclass(frozen=True)
class KVCacheStats:
    """A snapshot of the manager's counters (`manager.stats`)."""

    num_blocks: int
    num_used_blocks: int
    peak_used_blocks: int  # most blocks in use at once since creation or `reset_peak_usage()`
    num_free_blocks: int
    num_cached_blocks: int  # registered in the prefix cache, in use or free
    num_seqs: int
    num_swapped_seqs: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of those, tokens found cached
    evictions: int  # cached blocks reused for new data
    swapped_out_blocks: int
    swapped_in_blocks: int
    cow_copies: int  # blocks copied because a shared last block was written

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "usage": self.usage, "prefix_hit_rate": self.prefix_hit_rate}


@dataclass
class _Swapped:
    cpu_blocks: list[int]
    num_tokens: int
    token_ids: list[int] | None
    extra_key: Hashable


class KVCacheManager:
    """Paged KV cache for many sequences: allocation, sharing, swapping, statistics.

    Typical use (one decode step for a batch)::

        mgr = KVCacheManager(KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=256))
        cached = mgr.allocate("a", prompt_ids)           # prefix-cache hit: tokens already stored
        slots = mgr.append("a", len(prompt_ids) - cached)  # slots for the rest of the prompt
        mgr.cache.write(layer, k, v, slots)               # per layer
        out = mgr.cache.attend(layer, q, mgr.block_tables(["a"]), mgr.seq_lens(["a"]), ...)

    Sequence ids are any hashable. Every method that gets bad input raises `ValueError` and
    changes nothing; running out of blocks raises `OutOfBlocksError` and changes nothing.
    """

    def __init__(self, config: KVCacheConfig) -> None:
        if not isinstance(config, KVCacheConfig):
            raise ValueError(f"config must be a KVCacheConfig; got {type(config).__name__}")
        self.config = config
        self.block_size = config.block_size
        self.allocator = KVCacheAllocator(config.num_blocks, config.enable_prefix_caching)
        self.cache = PagedKVCache(config)
        self.transfer = (
            KVCacheTransfer(self.cache, config.num_cpu_blocks) if config.num_cpu_blocks else None
        )
        self._free_cpu_blocks = list(range(config.num_cpu_blocks - 1, -1, -1))
        self._table = BlockTable()
        self._seqs: dict[Hashable, KVCacheBlocks] = {}
        self._swapped: dict[Hashable, _Swapped] = {}
        # Sequences whose last block may have other owners: checked for copy-on-write on append.
        self._maybe_shared: set[KVCacheBlocks] = set()
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._swapped_out = 0
        self._swapped_in = 0
        self._cow_copies = 0

    # ---- lookups --------------------------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs or seq_id in self._swapped

    @property
    def seq_ids(self) -> list[Hashable]:
        """Sequences resident on the device (swapped-out ones are in `swapped_seq_ids`)."""
        return list(self._seqs)

    @property
    def swapped_seq_ids(self) -> list[Hashable]:
        return list(self._swapped)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used_blocks

    @property
    def used_bytes(self) -> int:
        """KV bytes held by sequences: blocks in use x bytes per block."""
        return self.allocator.num_used_blocks * self.config.bytes_per_block

    def _get(self, seq_id: Hashable) -> KVCacheBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            if seq_id in self._swapped:
                raise ValueError(
                    f"sequence {seq_id!r} is swapped out; call swap_in({seq_id!r}) first"
                ) from None
            raise ValueError(
                f"unknown sequence id {seq_id!r}: not allocated, or already freed "
                f"({len(self._seqs)} sequences are live)"
            ) from None
        except TypeError:
            raise ValueError(f"sequence id {seq_id!r} is not hashable") from None

    def _get_many(self, seq_ids: Iterable[Hashable]) -> list[KVCacheBlocks]:
        seqs = [self._get(s) for s in seq_ids]
        if len({id(s) for s in seqs}) != len(seqs):
            raise ValueError(f"duplicate sequence ids in {list(seq_ids)!r}")
        return seqs

    def seq_len(self, seq_id: Hashable) -> int:
        if seq_id in self._swapped:
            return self._swapped[seq_id].num_tokens
        return self._get(seq_id).num_tokens

    def get_blocks(self, seq_id: Hashable) -> KVCacheBlocks:
        """The sequence's `KVCacheBlocks` (its block-table row)."""
        return self._get(seq_id)

    def _rows(self, seq_ids: Sequence[Hashable]) -> np.ndarray:
        try:
            return np.fromiter((self._seqs[s].row for s in seq_ids), np.int64, len(seq_ids))
        except (KeyError, TypeError):
            for s in seq_ids:
                self._get(s)  # raises the precise error
            raise

    def block_tables(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """`[len(seq_ids), max_blocks]` int32 on the cache device; padding entries are 0."""
        rows = self._rows(seq_ids)
        width = max(int(self._table.num_blocks[rows].max(initial=0)), 1)
        table = self._table.ids[rows, :width]
        return torch.from_numpy(table).to(self.cache.pool.device)

    def seq_lens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """`[len(seq_ids)]` int32 token counts on the cache device."""
        rows = self._rows(seq_ids)
        lens = self._table.num_tokens[rows].astype(np.int32)
        return torch.from_numpy(lens).to(self.cache.pool.device)

    # ---- allocate / append ----------------------------------------------------------------
    def allocate(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int] | None = None,
        *,
        extra_key: Hashable = None,
    ) -> int:
        """Start a sequence. With `token_ids`, reuse the longest cached prefix of full blocks.

        Returns the number of prompt tokens already in the cache (the sequence's length now);
        at least one token is always left to compute, so the model has a query to run. Call
        `append` for the remaining tokens: appends without token ids continue the declared
        prompt, and its blocks are registered as they fill.
        """
        try:
            exists = seq_id in self
        except TypeError:
            raise ValueError(f"sequence id {seq_id!r} is not hashable") from None
        if exists:
            raise ValueError(f"sequence id {seq_id!r} is already allocated; free it first")
        ids = _as_token_list(token_ids) if token_ids is not None else None
        _check_hashable(extra_key, "extra_key")
        hits: list = []
        last_key = None
        if ids is not None and self.config.enable_prefix_caching:
            bs = self.block_size
            for i in range((len(ids) - 1) // bs if ids else 0):
                key = hash_block_tokens(last_key, ids[i * bs : (i + 1) * bs], extra_key)
                block = self.allocator.lookup(key)
                if block is None:
                    break
                hits.append(block)
                last_key = key
            self._prefix_queries += len(ids)
            self._prefix_hits += len(hits) * bs
        seq = KVCacheBlocks(self._table, self.allocator.blocks)
        self.allocator.touch(hits)
        seq.extend(hits)
        seq.num_tokens = len(hits) * self.block_size
        seq.num_hashed = len(hits)
        seq.last_key = last_key
        seq.token_ids = ids
        seq.extra_key = extra_key
        self._seqs[seq_id] = seq
        return seq.num_tokens

    def append(
        self, seq_id: Hashable, num_tokens: int, token_ids: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Reserve slots for `num_tokens` new tokens of one sequence.

        Returns their slot mapping (int64 `[num_tokens]`, slot = block_id * block_size +
        offset) on the cache device. With `token_ids` (and when the sequence's earlier tokens
        are known), blocks that fill up are registered in the prefix cache.
        """
        seq = self._get(seq_id)
        _check_count("num_tokens", num_tokens)
        ids = None
        if token_ids is not None:
            ids = _as_token_list(token_ids)
            if len(ids) != num_tokens:
                raise ValueError(
                    f"token_ids has {len(ids)} ids but num_tokens={num_tokens}; expected equal"
                )
        return self._append([seq], num_tokens, None if ids is None else [ids])

    def append_batch(
        self,
        seq_ids: Sequence[Hashable],
        num_tokens: int = 1,
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """`append` for many sequences at once (the decode hot path).

        Returns the slot mapping `[len(seq_ids) * num_tokens]`, sequence-major. All or
        nothing: if the pool is short, nothing is reserved.
        """
        seqs = self._get_many(seq_ids)
        _check_count("num_tokens", num_tokens)
        ids = None
        if token_ids is not None:
            ids = [_as_token_list(t) for t in token_ids]
            if len(ids) != len(seqs) or any(len(t) != num_tokens for t in ids):
                raise ValueError(
                    f"token_ids must be {len(seqs)} lists of {num_tokens} ids; got lengths "
                    f"{[len(t) for t in ids]}"
                )
        return self._append(seqs, num_tokens, ids)

    def _append(
        self, seqs: list[KVCacheBlocks], n: int, token_ids: list[list[int]] | None
    ) -> torch.Tensor:
        bs = self.block_size
        table = self._table
        rows = np.fromiter((s.row for s in seqs), np.int64, len(seqs))
        lens = table.num_tokens[rows]
        need = np.maximum((lens + n + bs - 1) // bs - table.num_blocks[rows], 0)
        cow, sole = [], []
        if self._maybe_shared:
            leaving: dict[int, int] = {}  # owners of a block that copy it away in this step
            for i, seq in enumerate(seqs):
                if seq not in self._maybe_shared:
                    continue
                last = seq[-1] if len(seq) else None
                if last is None or last.ref_count - leaving.get(last.block_id, 0) == 1:
                    sole.append(i)  # sole owner (the others copy away in this step)
                elif lens[i] % bs:
                    cow.append(i)
                    leaving[last.block_id] = leaving.get(last.block_id, 0) + 1
        total = int(need.sum()) + len(cow)
        if total > self.allocator.num_free_blocks:
            raise OutOfBlocksError(
                total,
                self.allocator.num_free_blocks,
                self.config.num_blocks,
                hint="raise num_blocks (or memory_budget_bytes), shorten the sequences, or free some",
            )
        # Past the last check: nothing below can fail, so the hints change only now (a sequence
        # is "sole" only because others copy away in this very step).
        for i in sole:
            seq = seqs[i]
            self._maybe_shared.discard(seq)
            last = seq[-1] if len(seq) else None
            if last is not None and lens[i] % bs and last.block_hash is not None:
                # Truncated while shared, so still registered for its full contents; this
                # step overwrites its tail, so it leaves the prefix index.
                self.allocator.unregister(last)
        if cow:
            self._copy_on_write([seqs[i] for i in cow])
        for i in np.flatnonzero(need):
            seqs[i].extend(self.allocator.allocate(int(need[i])))
        if len(seqs) == 1:
            pos = np.arange(lens[0], lens[0] + n)
            slots = table.ids[rows[0], pos // bs].astype(np.int64) * bs + pos % bs
        else:
            pos = lens[:, None] + np.arange(n)
            slots = table.ids[rows[:, None], pos // bs].astype(np.int64) * bs + pos % bs
        table.num_tokens[rows] = lens + n
        for i, seq in enumerate(seqs):
            known = seq.token_ids
            if known is None:
                if token_ids is None or lens[i]:
                    continue
                known = seq.token_ids = []
            end = int(lens[i]) + n
            if len(known) < end:
                if token_ids is None or len(known) != lens[i]:
                    seq.token_ids = None  # this step's tokens unknown: stop hashing on the fly
                    continue
                known.extend(token_ids[i])
            self._hash_full_blocks(seq)
        return torch.from_numpy(slots.reshape(-1)).to(self.cache.pool.device)

    def _copy_on_write(self, seqs: list[KVCacheBlocks]) -> None:
        """Give each sequence a private copy of its (shared) last block."""
        fresh = self.allocator.allocate(len(seqs))
        pairs = []
        for seq, new in zip(seqs, fresh):
            old = seq[-1]
            seq.set(len(seq) - 1, new)
            self.allocator.free([old])
            pairs.append((old.block_id, new.block_id))
            self._maybe_shared.discard(seq)
        self.cache.copy(pairs)
        self._cow_copies += len(pairs)

    def _hash_full_blocks(self, seq: KVCacheBlocks) -> None:
        """Register the sequence's full blocks (from `num_hashed` on) in the prefix cache."""
        if seq.token_ids is None or not self.config.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(len(seq.token_ids), seq.num_tokens) // bs
        for i in range(seq.num_hashed, full):
            key = hash_block_tokens(
                seq.last_key, seq.token_ids[i * bs : (i + 1) * bs], seq.extra_key
            )
            self.allocator.register(seq[i], key)
            seq.last_key = key
        seq.num_hashed = max(seq.num_hashed, full)

    def register_prefix(
        self, seq_id: Hashable, token_ids: Sequence[int], *, extra_key: Hashable = None
    ) -> int:
        """Declare the tokens a sequence holds, registering its full blocks for reuse.

        `token_ids` are the sequence's first tokens (at most its length; typically all of
        them, e.g. prompt + answer at the end of a generate call). Returns how many blocks
        are now registered for this sequence.
        """
        seq = self._get(seq_id)
        ids = _as_token_list(token_ids)
        _check_hashable(extra_key, "extra_key")
        if len(ids) > seq.num_tokens:
            raise ValueError(
                f"register_prefix got {len(ids)} token ids for sequence {seq_id!r}, which holds "
                f"{seq.num_tokens} tokens; expected at most {seq.num_tokens}"
            )
        seq.extra_key = extra_key if extra_key is not None else seq.extra_key
        seq.num_hashed, seq.last_key = 0, None
        seq.token_ids = ids
        self._hash_full_blocks(seq)
        if len(ids) < seq.num_tokens:
            seq.token_ids = None  # later tokens unknown: no hashing on the fly
        return seq.num_hashed

    def forget_unwritten(self, seq_id: Hashable, num_tokens: int) -> int:
        """The sequence's K/V from token `num_tokens` on were reserved but never written (say,
        a forward failed midway): take the blocks holding them out of the prefix cache, and
        stop registering this sequence's blocks. The sequence keeps its blocks and length.

        Returns how many blocks left the prefix cache.
        """
        seq = self._get(seq_id)
        _check_position(num_tokens, seq, f"forget_unwritten of sequence {seq_id!r} from")
        first = int(num_tokens) // self.block_size
        stale = [b for b in seq.blocks[first:] if b.block_hash is not None]
        for block in stale:
            self.allocator.unregister(block)
        seq.token_ids = None  # its later tokens are not what the blocks hold
        return len(stale)

    # ---- sharing --------------------------------------------------------------------------
    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start `child_id` as a copy of `parent_id` that shares all its blocks."""
        parent = self._get(parent_id)
        try:
            exists = child_id in self
        except TypeError:
            raise ValueError(f"sequence id {child_id!r} is not hashable") from None
        if exists:
            raise ValueError(
                f"cannot fork into {child_id!r}: that sequence id is already allocated"
            )
        blocks = parent.blocks
        child = KVCacheBlocks(self._table, self.allocator.blocks)
        self.allocator.touch(blocks)
        child.extend(blocks)
        child.num_tokens = parent.num_tokens
        child.num_hashed, child.last_key = parent.num_hashed, parent.last_key
        child.token_ids = None if parent.token_ids is None else list(parent.token_ids)
        child.extra_key = parent.extra_key
        self._seqs[child_id] = child
        self._maybe_shared.update((parent, child))

    def reorder(self, seq_ids: Sequence[Hashable], src_indices: Sequence[int]) -> None:
        """Beam search: `seq_ids[i]` becomes a copy of `seq_ids[src_indices[i]]`, sharing blocks.

        Only ref counts change; a shared last block is copied later, on the next append.
        """
        seqs = self._get_many(seq_ids)
        src = np.asarray(src_indices, dtype=np.int64).reshape(-1)
        if src.shape[0] != len(seqs) or (src.size and (src.min() < 0 or src.max() >= len(seqs))):
            raise ValueError(
                f"src_indices must hold {len(seqs)} indices in 0..{len(seqs) - 1}; "
                f"got {list(src_indices)!r}"
            )
        changed = np.flatnonzero(src != np.arange(len(seqs)))
        if changed.size == 0:
            return
        t = self._table
        rows = np.fromiter((s.row for s in seqs), np.int64, len(seqs))
        dst_rows, src_rows = rows[changed], rows[src[changed]]

        def ids_of(rs: np.ndarray) -> np.ndarray:
            width = int(t.num_blocks[rs].max(initial=0))
            mask = np.arange(width) < t.num_blocks[rs][:, None]
            return t.ids[rs, :width][mask]

        n = self.config.num_blocks
        delta = np.bincount(ids_of(src_rows), minlength=n) - np.bincount(
            ids_of(dst_rows), minlength=n
        )
        pool = self.allocator.blocks
        for b in np.flatnonzero(delta > 0):  # add owners first: nothing is freed transiently
            self.allocator.touch([pool[b]] * int(delta[b]))
        for b in np.flatnonzero(delta < 0):
            self.allocator.free([pool[b]] * int(-delta[b]))
        t.ensure_cols(int(t.num_blocks[src_rows].max(initial=0)))
        t.ids[dst_rows] = t.ids[src_rows]
        t.num_blocks[dst_rows] = t.num_blocks[src_rows]
        t.num_tokens[dst_rows] = t.num_tokens[src_rows]
        old = [
            (s.num_hashed, s.last_key, s.token_ids, s.extra_key, s in self._maybe_shared)
            for s in seqs
        ]
        counts = np.bincount(src, minlength=len(seqs))
        for i in changed:
            j = int(src[i])
            seq = seqs[i]
            seq.num_hashed, seq.last_key, ids, seq.extra_key, shared = old[j]
            seq.token_ids = None if ids is None else list(ids)
            if shared or counts[j] > 1:
                self._maybe_shared.add(seq)
                self._maybe_shared.add(seqs[j])
            else:
                self._maybe_shared.discard(seq)

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens (assisted decoding rejects drafts this way).

        Dropped full blocks that are registered stay findable in the prefix cache, since they
        hold the K/V of their tokens. To undo an append whose K/V were never written, call
        `forget_unwritten` first.
        """
        seq = self._get(seq_id)
        _check_position(num_tokens, seq, f"cannot truncate sequence {seq_id!r} to")
        bs = self.block_size
        keep = -(-int(num_tokens) // bs)
        self.allocator.free(seq.truncate(keep))
        seq.num_tokens = int(num_tokens)
        if seq.token_ids is not None:
            seq.token_ids = seq.token_ids[:num_tokens]
        if seq.num_hashed > num_tokens // bs:
            seq.num_hashed = num_tokens // bs
            seq.last_key = seq[seq.num_hashed - 1].block_hash if seq.num_hashed else None
            if seq.last_key is None:
                seq.num_hashed = 0  # chain lost (that block was not registered): rehash later
        if num_tokens % bs:
            last = seq[-1]
            if last.ref_count > 1:
                self._maybe_shared.add(seq)  # next write copies it
            elif last.block_hash is not None:
                self.allocator.unregister(last)  # its tail will be overwritten

    # ---- free / swap ----------------------------------------------------------------------
    def free(self, seq_id: Hashable) -> None:
        """Release a sequence (resident or swapped out). Its registered blocks stay cached."""
        if seq_id in self._swapped:
            self._free_cpu_blocks.extend(self._swapped.pop(seq_id).cpu_blocks)
            return
        seq = self._get(seq_id)
        self.allocator.free(seq.blocks[::-1])
        self._maybe_shared.discard(seq)
        seq.release()
        del self._seqs[seq_id]

    def free_all(self, seq_ids: Iterable[Hashable] | None = None) -> None:
        """Free several sequences (all of them by default), skipping ids not allocated."""
        ids = list(self) if seq_ids is None else list(seq_ids)
        for seq_id in ids:
            if seq_id in self:
                self.free(seq_id)

    def __iter__(self):
        yield from list(self._seqs)
        yield from list(self._swapped)

    def swap_out(self, seq_id: Hashable) -> None:
        """Move a sequence's blocks to the CPU pool and free its device blocks."""
        if self.transfer is None:
            raise ValueError(
                "swap_out needs CPU swap space; set num_cpu_blocks > 0 in KVCacheConfig"
            )
        seq = self._get(seq_id)
        n = len(seq)
        if n > len(self._free_cpu_blocks):
            raise OutOfBlocksError(
                n,
                len(self._free_cpu_blocks),
                self.config.num_cpu_blocks,
                hint="CPU swap space is full: raise num_cpu_blocks",
            )
        cpu = [self._free_cpu_blocks.pop() for _ in range(n)]
        self.transfer.swap_out(seq.block_ids, cpu)
        self._swapped[seq_id] = _Swapped(cpu, seq.num_tokens, seq.token_ids, seq.extra_key)
        self.allocator.free(seq.blocks[::-1])
        self._maybe_shared.discard(seq)
        seq.release()
        del self._seqs[seq_id]
        self._swapped_out += n

    def swap_in(self, seq_id: Hashable) -> None:
        """Bring a swapped-out sequence back into fresh device blocks."""
        if seq_id not in self._swapped:
            if seq_id in self._seqs:
                raise ValueError(f"sequence {seq_id!r} is not swapped out")
            self._get(seq_id)  # unknown id: raises
        swapped = self._swapped[seq_id]
        blocks = self.allocator.allocate(len(swapped.cpu_blocks))  # may raise: nothing changed
        self.transfer.swap_in(swapped.cpu_blocks, [b.block_id for b in blocks])
        seq = KVCacheBlocks(self._table, self.allocator.blocks)
        seq.extend(blocks)
        seq.num_tokens = swapped.num_tokens
        seq.token_ids, seq.extra_key = swapped.token_ids, swapped.extra_key
        self._seqs[seq_id] = seq
        del self._swapped[seq_id]
        self._free_cpu_blocks.extend(swapped.cpu_blocks)
        self._swapped_in += len(blocks)
        self._hash_full_blocks(seq)

    # ---- prefix cache / stats -------------------------------------------------------------
    def reset_peak_usage(self) -> None:
        """Measure `stats.peak_used_blocks` from now on (e.g. around one generate call)."""
        self.allocator.reset_peak()

    @property
    def peak_used_bytes(self) -> int:
        """KV bytes at the peak of blocks in use: `stats.peak_used_blocks` x bytes per block."""
        return self.allocator.peak_used_blocks * self.config.bytes_per_block

    def reset_prefix_cache(self) -> int:
        """Forget every registered prefix (data in use is kept). Returns blocks forgotten."""
        n = self.allocator.reset_prefix_cache()
        for seq in self._seqs.values():
            seq.num_hashed, seq.last_key = 0, None
        return n

    @property
    def stats(self) -> KVCacheStats:
        a = self.allocator
        return KVCacheStats(
            num_blocks=a.num_blocks,
            num_used_blocks=a.num_used_blocks,
            peak_used_blocks=a.peak_used_blocks,
            num_free_blocks=a.num_free_blocks,
            num_cached_blocks=a.num_cached_blocks,
            num_seqs=len(self._seqs),
            num_swapped_seqs=len(self._swapped),
            prefix_queries=self._prefix_queries,
            prefix_hits=self._prefix_hits,
            evictions=a.num_evictions,
            swapped_out_blocks=self._swapped_out,
            swapped_in_blocks=self._swapped_in,
            cow_copies=self._cow_copies,
        )

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (used by tests; O(blocks))."""
        owners: dict[int, int] = {}
        bs = self.block_size
        for seq_id, seq in self._seqs.items():
            assert len(seq) == -(-seq.num_tokens // bs), (
                f"sequence {seq_id!r}: {len(seq)} blocks for {seq.num_tokens} tokens"
            )
            for b in seq.block_ids:
                owners[b] = owners.get(b, 0) + 1
        self.allocator.check_invariants(owners)
        cpu_used = sum(len(s.cpu_blocks) for s in self._swapped.values())
        assert cpu_used + len(self._free_cpu_blocks) == self.config.num_cpu_blocks
        assert (
            self.allocator.num_free_blocks + self.allocator.num_used_blocks
            == self.config.num_blocks
        )

    # ---- display --------------------------------------------------------------------------
    def __repr__(self) -> str:
        s = self.stats
        c = self.config
        return (
            f"KVCacheManager(seqs={s.num_seqs}, swapped={s.num_swapped_seqs}, "
            f"blocks={s.num_used_blocks}/{s.num_blocks} used ({s.usage:.1%}), "
            f"cached={s.num_cached_blocks}, block_size={c.block_size}, layers={c.num_layers}, "
            f"kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, dtype={c.dtype.value}, "
            f"device={self.cache.pool.device}, prefix_hits={s.prefix_hits}/{s.prefix_queries} tokens)"
        )

    def block_map(self) -> list[dict]:
        """Per block: state ('free', 'cached', 'used', 'shared'), ref count, owners, tokens."""
        owners: dict[int, list] = {}
        fill: dict[int, int] = {}
        bs = self.block_size
        for seq_id, seq in self._seqs.items():
            for i, b in enumerate(seq.block_ids):
                owners.setdefault(b, []).append(seq_id)
                fill[b] = min(bs, seq.num_tokens - i * bs)
        out = []
        for block in self.allocator.blocks:
            if block.ref_count == 0:
                state = "free" if block.block_hash is None else "cached"
            else:
                state = "shared" if block.ref_count > 1 else "used"
            out.append(
                {
                    "block_id": block.block_id,
                    "state": state,
                    "ref_count": block.ref_count,
                    "owners": owners.get(block.block_id, []),
                    "num_tokens": fill.get(block.block_id, 0),
                    "hashed": block.block_hash is not None,
                }
            )
        return out

    def _repr_html_(self, max_blocks: int = 1024) -> str:
        palette = [
            "#4e79a7",
            "#59a14f",
            "#9c755f",
            "#af7aa1",
            "#76b7b2",
            "#edc948",
            "#e15759",
            "#b07aa1",
            "#86bcb6",
            "#8cd17d",
        ]
        seq_color = {sid: palette[i % len(palette)] for i, sid in enumerate(self._seqs)}
        cells = []
        for info in self.block_map()[:max_blocks]:
            state = info["state"]
            if state == "free":
                color = "#eeeeee"
            elif state == "cached":
                color = "#cfe2f3"
            elif state == "shared":
                color = "#f28e2b"
            else:
                color = seq_color[info["owners"][0]]
            title = (
                f"block {info['block_id']}: {state}, ref {info['ref_count']}, "
                f"{info['num_tokens']}/{self.block_size} tokens"
                + (", hashed" if info["hashed"] else "")
                + (f", seqs {info['owners']}" if info["owners"] else "")
            )
            label = str(info["ref_count"]) if info["ref_count"] > 1 else ""
            cells.append(
                f'<div title="{html.escape(title)}" style="width:14px;height:14px;margin:1px;'
                f"background:{color};font:9px monospace;color:#fff;text-align:center;"
                f'line-height:14px;opacity:{0.45 + 0.55 * info["num_tokens"] / self.block_size if state in ("used", "shared") else 1}">'
                f"{label}</div>"
            )
        legend = " ".join(
            f'<span style="background:{seq_color[s]};color:#fff;padding:0 4px">{html.escape(str(s))}</span>'
            for s in list(self._seqs)[:20]
        )
        more = (
            f"<div>… {self.config.num_blocks - max_blocks} more blocks</div>"
            if self.config.num_blocks > max_blocks
            else ""
        )
        return (
            f"<div><pre>{html.escape(repr(self))}</pre>"
            f'<div style="display:flex;flex-wrap:wrap;max-width:640px">{"".join(cells)}</div>{more}'
            f'<div style="font:11px sans-serif;margin-top:4px">free <span style="background:#eeeeee">&nbsp;&nbsp;</span> '
            f'cached <span style="background:#cfe2f3">&nbsp;&nbsp;</span> '
            f'shared <span style="background:#f28e2b">&nbsp;&nbsp;</span> sequences: {legend}</div></div>'
        )


def _as_token_list(token_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D; got shape {tuple(token_ids.shape)}")
        return token_ids.tolist()
    try:
        ids = [int(t) for t in token_ids]
    except (TypeError, ValueError):
        raise ValueError(f"token_ids must be a sequence of ints; got {token_ids!r}") from None
    return ids


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= 1")


def _check_position(num_tokens: object, seq: KVCacheBlocks, what: str) -> None:
    """`num_tokens` must be a token count within the sequence: 0..its length."""
    if (
        isinstance(num_tokens, bool)
        or not isinstance(num_tokens, (int, np.integer))
        or not (0 <= num_tokens <= seq.num_tokens)
    ):
        raise ValueError(
            f"{what} {num_tokens!r} tokens; expected an integer in 0..{seq.num_tokens}"
        )


def _check_hashable(value: object, name: str) -> None:
    try:
        hash(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} is not hashable") from None


# Re-exported for callers that catch it from here.
__all__ += ["BlockHash", "OutOfBlocksError"]
