"""`PagedCache`: a `transformers.Cache` whose K/V live in a `KVCacheManager`'s blocks.

One manager sequence per batch row. transformers sees one length for the whole batch (the
columns it has fed, padding included); the manager holds each row's columns from its first
real token on: leading pads are never stored (slot -1), and pads after it (right padding, holes
in the mask) are stored invalid, hidden from every query (see `_hf_padding`). This class
translates between the two: per forward pass, `begin_forward` (called by the model's forward
wrapper with the attention mask and input ids) plans one manager `Step` for every row (the
columns each row lacks, with their ids and validity; forks when generate expands rows for
beams), every layer's `update` writes its K/V through the step and
`attend` runs `paged_attention` on its blocks, and `end_forward` commits the step or, if the
forward failed, aborts it, which leaves the rows as they were. Nothing is gathered and no tensor
grows. (Models whose attention bypasses transformers' registry get contiguous K/V from `update`
instead, through `gather_kv`: see `_hf_gather`.)

Queries are packed `[batch * q_len, heads, head_dim]` with `q_len` queries per row, so a row's
left pads are queries before its first real token: when nothing precedes them they see no key
and come out as zeros, like the rows transformers itself discards.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from pagedkv.kvcache import KVCacheManager, Step

from . import _forward_context
from ._hf_attention import AttendsThroughStep, NoBackward
from ._hf_gather import padded_kv
from ._hf_padding import check_positions, window_spans

__all__ = ["PagedCache"]


class _PagedLayer(CacheLayerMixin):
    """Per-layer entry of `Cache.layers`. Holds nothing: `PagedCache` answers for all layers.

    transformers inspects these (`is_sliding`, `is_compileable`, `is_croppable`, ...), so they
    exist; every data method goes through `PagedCache`, which overrides the `Cache` methods.
    """

    is_compileable = False
    is_croppable = True
    supports_early_init = False
    is_sliding = False

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("PagedCache.update handles every layer")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise NotImplementedError("PagedCache.get_mask_sizes handles every layer")

    def get_seq_length(self) -> int:
        raise NotImplementedError("PagedCache.get_seq_length handles every layer")

    def get_max_length(self) -> int:
        return -1


@dataclass
class _Forward:
    """One forward pass in flight: its manager step and what transformers needs around it."""

    step: Step
    batch: int
    q_len: int
    gather: bool  # return contiguous K/V from update (models outside the registry)
    before: tuple[list[Hashable], list[int], int, bool]  # rows, fed, seen, holes: for an abort
    counted: bool = False  # whether `_seen` includes this forward's columns yet
    attended: dict[int, int | None] = field(default_factory=dict)  # layer -> sliding window
    gather_index: torch.Tensor | None = None  # padded [batch * width] position of each token


class _Held:
    """What a cache holds in its manager: its rows and its open step. Released when the cache
    is freed or garbage collected (a cache dropped mid-forward aborts its step first)."""

    def __init__(self, manager: KVCacheManager) -> None:
        self.manager = manager
        self.rows: list[Hashable] = []  # manager sequence id of each batch row
        self.step: Step | None = None

    def release(self) -> None:
        if self.step is not None:
            self.step.abort()
            self.step = None
        for seq_id in self.rows:
            self.manager.free(seq_id)
        self.rows.clear()


class PagedCache(AttendsThroughStep, Cache):
    """A transformers `Cache` on the blocks of `manager` (see the module docstring).

    Pass it to `generate` (`cache=` on transformers >= 5.24, `past_key_values=` before) or to a
    forward of a model prepared with `enable_paged_attention`. Its sequences are freed by
    `free()` / `reset()`, or when the object is garbage collected.
    """

    _next_id = itertools.count()  # sequence ids unique across caches that share a manager

    def __init__(self, manager: KVCacheManager, *, extra_key: Hashable = None) -> None:
        if not isinstance(manager, KVCacheManager):
            raise TypeError(f"PagedCache needs a KVCacheManager; got {type(manager).__name__}")
        super().__init__(layers=[_PagedLayer() for _ in range(manager.config.num_layers)])
        self.manager = manager
        self.extra_key = extra_key  # prefix-cache namespace (e.g. a model id)
        self._held = _Held(manager)
        self._rows = self._held.rows
        self._fed: list[int] = []  # columns each row stored (from its first real one on)
        self._seen = 0  # columns fed (transformers' view of the length; pads included)
        self._holes = False  # whether a row stored a pad (then positions skip them)
        self._forward: _Forward | None = None
        self.last_forward: _Forward | None = None  # the latest ended forward (inspection)
        # How many tokens a `crop` may drop (assisted decoding, whose candidates may span
        # forwards): sliding windows keep what queries after such a crop see. None: a crop
        # back into the last forward, if it fed at most CROP_STEP tokens.
        self.crop_margin: int | None = None
        self._finalizer = weakref.finalize(self, self._held.release)

    # ---- sequences ------------------------------------------------------------------------
    @property
    def seq_ids(self) -> list[Hashable]:
        """The manager sequence id of each batch row."""
        return list(self._rows)

    def _distinct_blocks(self) -> list[int]:
        """Per KV cache group: distinct blocks this cache's rows hold."""
        return [
            len({b.block_id for s in self._rows for b in self.manager.get_blocks(s, g).blocks})
            for g in range(len(self.manager.config.groups))
        ]

    @property
    def num_blocks(self) -> int:
        """Distinct blocks this cache's rows hold (shared blocks counted once), every KV cache
        group together."""
        return sum(self._distinct_blocks())

    @property
    def kv_bytes(self) -> int:
        """KV bytes this cache holds: each group's distinct blocks x its bytes per block."""
        cfg = self.manager.config
        return sum(n * cfg.group_bytes_per_block(g) for g, n in enumerate(self._distinct_blocks()))

    def _new_id(self) -> tuple[str, int]:
        return ("pagedkv.hf", next(self._next_id))

    def allocate_prompts(
        self, prompts: Sequence[Sequence[int]], num_pads: Sequence[int], *, reuse: bool = True
    ) -> list[int]:
        """Start one sequence per row, reusing cached prefixes; returns each row's cached count.

        `prompts` are the rows' real tokens (None: not known as a prefix, e.g. a row with pads
        inside), `num_pads` their left padding. Afterwards
        `get_seq_length()` is the number of leading columns every row has cached (pads count as
        cached), so `generate` computes only the columns after it; columns that some rows hold
        already are then skipped for them (slot -1). `reuse=False` skips the lookup.
        """
        if self._rows:
            raise ValueError("allocate_prompts needs an empty PagedCache")
        cached = []
        try:
            for tokens in prompts:
                seq_id = self._new_id()
                ids = list(tokens) if reuse and tokens is not None else None
                cached.append(self.manager.allocate(seq_id, ids, extra_key=self.extra_key))
                self._rows.append(seq_id)
        except BaseException:
            self.free()
            raise
        # Without a cached prefix the first forward feeds every column, pads included (as
        # stock does); with one, the columns every row holds (its pads count) are skipped.
        start = 0
        if any(cached):
            start = min(p + c for p, c in zip(num_pads, cached, strict=True))
        self._fed[:] = [max(0, start - p) for p in num_pads]
        self._seen = start
        return cached

    def free(self) -> None:
        """Release every row's blocks (registered prefix blocks stay reusable)."""
        if self._forward is not None:
            self._end(self._forward, ok=False)
        self._held.release()
        self._fed.clear()
        self._seen = 0
        self._holes = False

    # ---- one forward pass -----------------------------------------------------------------
    def begin_forward(
        self,
        attention_mask: torch.Tensor | None,
        batch: int,
        q_len: int,
        *,
        gather: bool = False,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """Plan this forward's step for every row (all layers): slots, block tables, lengths.

        With `gather`, `update` returns each layer's K/V as contiguous left-padded tensors for
        a model whose own attention code reads them (falcon, bloom, mpt: outside the registry).
        `input_ids` (`[batch, q_len]`), when known, give the manager the new tokens' ids (so
        the blocks they fill join the prefix cache); `position_ids`, when known, are checked
        against the rows on multi-token steps. A forward begun here and never ended is aborted
        first.
        """
        if self._forward is not None:
            self._end(self._forward, ok=False)
        if attention_mask is not None and attention_mask.shape[-1] != self._seen + q_len:
            raise RuntimeError(
                f"the forward feeds {q_len} new columns with an attention mask of width "
                f"{attention_mask.shape[-1]}, but the cache holds {self._seen} columns; "
                f"expected a mask of width {self._seen + q_len} (were cached tokens fed again?)"
            )
        if not self._rows:
            for _ in range(batch):
                seq_id = self._new_id()
                self.manager.allocate(seq_id, extra_key=self.extra_key)
                self._rows.append(seq_id)
                self._fed.append(0)
        if batch % len(self._rows):
            raise ValueError(
                f"PagedCache holds {len(self._rows)} rows but the forward has batch size {batch}"
            )
        expand = batch // len(self._rows)  # generate repeats prompts for beams / return seqs
        spans, window = window_spans(attention_mask, self._fed, q_len, expand)
        # tokens each row appends: the stored columns it does not hold yet (the window's last)
        new = [
            max(0, f + r - self.manager.seq_len(s))
            for s, f, r in zip(self._rows, self._fed, spans, strict=True)
        ]
        valid = None
        if window is not None:
            valid = [w[q_len - n :] for w, n in zip(window, new, strict=True)]
            if all(bool(v.all()) for v in valid):
                valid = None
        if position_ids is not None and q_len > 1 and valid is None and not self._holes:
            check_positions(position_ids, self._fed, spans, q_len, expand)
        ids = None
        if input_ids is not None and tuple(input_ids.shape) == (batch, q_len):
            if all(n == q_len for n in new):  # every column (decode): the ids as they are
                ids = input_ids[::expand]
            else:
                rows = input_ids[::expand].tolist()
                ids = [row[q_len - n :] for row, n in zip(rows, new, strict=True)]
        forks = None
        if expand > 1:
            forks = [[self._new_id() for _ in range(expand - 1)] for _ in self._rows]
        step = self.manager.step(
            self._rows,
            new,
            token_ids=ids,
            valid=valid,
            num_queries=q_len,
            forks=forks,
            keep=self.crop_margin,
        )
        before = (list(self._rows), list(self._fed), self._seen, self._holes)
        self._holes = self._holes or valid is not None
        self._held.step = step
        self._rows[:] = step.seq_ids
        self._fed[:] = [f + r for f, r in zip(self._fed, spans, strict=True) for _ in range(expand)]
        self._forward = _Forward(step, batch, q_len, gather, before)
        _forward_context.enter(self)

    def end_forward(self, ok: bool = True) -> bool:
        """Close the forward: commit its step when it returned (`ok`) with every layer's K/V
        written, abort it otherwise (the rows are then as before it). Returns whether it
        committed."""
        if self._forward is None:
            return False
        return self._end(self._forward, ok)

    def _end(self, forward: _Forward, ok: bool) -> bool:
        self._forward, self.last_forward, self._held.step = None, forward, None
        _forward_context.leave(self)
        step = forward.step
        if ok and len(step.layers_written) == self.manager.config.num_layers:
            self._count(forward)
            step.commit()
            return True
        step.abort()
        self._rows[:], self._fed[:], self._seen, self._holes = forward.before
        return False

    def _count(self, forward: _Forward) -> None:
        """Add the forward's columns to the length transformers sees.

        Like `DynamicCache`, whose length grows when layer 0 stores the step: before that
        (position ids, mask sizes) the model reads the past length, after it the new one.
        """
        if not forward.counted:
            forward.counted = True
            self._seen += forward.q_len

    def _current(self) -> _Forward:
        if self._forward is None:
            raise RuntimeError(
                "PagedCache used outside a forward of a model prepared with "
                "enable_paged_attention (its forward wrapper starts each step)"
            )
        return self._forward

    # ---- transformers Cache API -----------------------------------------------------------
    # update and attend run outside torch.compile's graphs: they read and write the pool
    # through Python state (the step), which a graph would capture as constants.
    @torch.compiler.disable
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's K/V `[batch, kv_heads, q_len, head_dim]` into the blocks.

        Returns the inputs unchanged (pagedkv attention reads the blocks, not these). With
        `kwargs=` (transformers >= 5.24) the cache is handed to the attention function there.
        """
        forward = self._current()
        batch, heads, q_len, head_dim = key_states.shape
        cfg = self.manager.config
        if (batch, q_len) != (forward.batch, forward.q_len) or (heads, head_dim) != (
            cfg.num_kv_heads,
            cfg.head_dim,
        ):
            raise ValueError(
                f"layer {layer_idx} K/V has [batch, kv_heads, q_len, head_dim] = "
                f"{list(key_states.shape)}; the cache expects [{forward.batch}, "
                f"{cfg.num_kv_heads}, {forward.q_len}, {cfg.head_dim}]"
            )
        dtype = cfg.torch_dtype
        key = key_states.transpose(1, 2).reshape(batch * q_len, heads, head_dim).to(dtype)
        value = value_states.transpose(1, 2).reshape(batch * q_len, heads, head_dim).to(dtype)
        forward.step.write(layer_idx, key, value)
        if layer_idx == 0:
            self._count(forward)
        if forward.gather:
            key, value = padded_kv(forward, cfg, layer_idx, self._seen, key_states.dtype)
            if key_states.requires_grad and torch.is_grad_enabled():
                key, value = (
                    NoBackward.apply(key_states, key),
                    NoBackward.apply(value_states, value),
                )
            return key, value
        _forward_context.hand_over(self, kwargs)
        return key_states, value_states

    def _attending(self, layer_idx: int, sliding_window: int | None) -> Step:
        """The step `attend` runs through (the layer's call is recorded for the enable probe)."""
        forward = self._current()
        forward.attended[layer_idx] = sliding_window
        return forward.step

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seen + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes row beam_idx[i]'s blocks (ref counts; copy on next write)."""
        src = [int(i) for i in beam_idx.tolist()]
        self.manager.reorder(self._rows, src)
        self._fed[:] = [self._fed[i] for i in src]

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (a positive value is the legacy new length)."""
        tokens_to_remove = int(tokens_to_remove)  # transformers 5.17 passes a 0-d tensor
        remove = self._seen - tokens_to_remove if tokens_to_remove > 0 else -tokens_to_remove
        if remove <= 0:
            return
        for seq_id in self._rows:
            self.manager.truncate(seq_id, max(0, self.manager.seq_len(seq_id) - remove))
        self._fed[:] = [max(0, f - remove) for f in self._fed]
        self._seen = max(0, self._seen - remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(len(self._rows)).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (a row picked twice is forked, sharing its blocks)."""
        picked = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        rows, fed = list(self._rows), list(self._fed)
        new_rows, used = [], set()
        for i in picked:
            if i in used:
                child = self._new_id()
                self.manager.fork(rows[i], child)
                new_rows.append(child)
            else:
                used.add(i)
                new_rows.append(rows[i])
        for i, seq_id in enumerate(rows):
            if i not in used:
                self.manager.free(seq_id)
        self._rows[:] = new_rows
        self._fed[:] = [fed[i] for i in picked]

    def reset(self) -> None:
        self.free()

    def activate_past_recording(self) -> None:
        pass  # every past token stays addressable until crop / free

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return len(self._rows) if self._rows else -1

    def __repr__(self) -> str:
        lens = [self.manager.seq_len(s) for s in self._rows]
        return f"PagedCache(rows={len(self._rows)}, seq_lens={lens}, seen={self._seen})"
