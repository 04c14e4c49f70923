"""`PagedCache`: a `transformers.Cache` whose K/V live in a `KVCacheManager`'s blocks.

One manager sequence per batch row. transformers sees one length for the whole batch (the
columns it has fed, left padding included); the manager holds each row's real tokens only, since
pads are never stored (slot -1). Per forward pass, `begin_forward` (called by the model's forward
pre-hook with the attention mask) reserves the slots of every row once; then each layer's
`update` writes its new K/V with one `write_kv` and `attend` runs `paged_attention` on the
blocks. Nothing is gathered and no tensor grows. (Models whose attention bypasses transformers'
registry get contiguous K/V from `update` instead, through `gather_kv`: see `_gathered`.)

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

from pagedkv.kvcache import KVCacheManager

from ._hf_attention import CACHE_KWARG

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
class _Step:
    """What one forward pass reads: computed once in `begin_forward`, used by every layer."""

    slot_mapping: torch.Tensor  # int64 [batch * q_len]; -1 = pad or already cached (not written)
    block_tables: torch.Tensor  # int32 [batch, max_blocks]
    seq_lens: torch.Tensor  # int32 [batch], real tokens per row including this step's
    query_start_loc: torch.Tensor | None  # int32 [batch + 1]; None when q_len == 1 (decode)
    batch: int
    q_len: int
    gather: bool = False  # return contiguous K/V from update (models outside the registry)
    counted: bool = False  # whether `_seen` includes this step yet
    written: set[int] = field(default_factory=set)  # layers that stored K/V this step
    attended: dict[int, int | None] = field(default_factory=dict)  # layer -> its sliding window
    gather_index: torch.Tensor | None = None  # padded [batch * width] position of each token
    # rows before this step's forks, and the tokens each appended (to forget them on failure)
    appended: tuple[Sequence[Hashable], Sequence[int]] = ((), ())


def _free_rows(manager: KVCacheManager, rows: list[Hashable]) -> None:
    for seq_id in rows:
        if seq_id in manager:
            manager.free(seq_id)
    rows.clear()


class PagedCache(Cache):
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
        self._rows: list[Hashable] = []  # manager sequence id of each batch row
        self._fed: list[int] = []  # real tokens of each row that transformers has fed so far
        self._seen = 0  # columns fed (transformers' view of the length; pads included)
        self._step: _Step | None = None
        self.last_step: _Step | None = None  # the latest finished forward's step (inspection)
        # Token bookkeeping for `row_tokens` (None = not recorded): each row's tokens cached at
        # the start, then ("feed", input_ids, new tokens per row) / ("perm", source rows) /
        # ("crop", n) in order. Replayed once, at the end of a generate call.
        self._base: list[list[int]] | None = None
        self._history: list[tuple] | None = None
        self._finalizer = weakref.finalize(self, _free_rows, manager, self._rows)

    # ---- sequences ------------------------------------------------------------------------
    @property
    def seq_ids(self) -> list[Hashable]:
        """The manager sequence id of each batch row."""
        return list(self._rows)

    @property
    def num_blocks(self) -> int:
        """Distinct blocks this cache's rows hold (shared blocks counted once)."""
        ids: set[int] = set()
        for seq_id in self._rows:
            ids.update(self.manager.get_blocks(seq_id).block_ids)
        return len(ids)

    @property
    def kv_bytes(self) -> int:
        """KV bytes this cache holds: distinct blocks x bytes per block (all layers, K and V)."""
        return self.num_blocks * self.manager.config.bytes_per_block

    def _new_id(self) -> tuple[str, int]:
        return ("pagedkv.hf", next(self._next_id))

    def allocate_prompts(
        self, prompts: Sequence[Sequence[int]], num_pads: Sequence[int], *, reuse: bool = True
    ) -> list[int]:
        """Start one sequence per row, reusing cached prefixes; returns each row's cached count.

        `prompts` are the rows' real tokens, `num_pads` their left padding. Afterwards
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
                ids = list(tokens) if reuse else None
                cached.append(self.manager.allocate(seq_id, ids, extra_key=self.extra_key))
                self._rows.append(seq_id)
        except BaseException:
            self.free()
            raise
        start = min((p + c for p, c in zip(num_pads, cached, strict=True)), default=0)
        self._fed[:] = [max(0, start - p) for p in num_pads]
        self._seen = start
        self._base = [list(t[:c]) for t, c in zip(prompts, cached, strict=True)]
        self._history = []
        return cached

    def row_tokens(self) -> list[list[int]] | None:
        """The token ids each row holds, when every step's tokens were recorded, else None.

        Recorded from `allocate_prompts` on, for forwards that receive `input_ids`; the generate
        hook uses it to register the full blocks of every row, beams included, for reuse.
        """
        if self._history is None or self._base is None:
            return None
        rows = [list(b) for b in self._base]
        for entry in self._history:
            if entry[0] == "perm":
                rows = [list(rows[j]) for j in entry[1]]
            elif entry[0] == "crop":
                rows = [r[: max(0, len(r) - entry[1])] for r in rows]
            else:
                ids, new = entry[1].tolist(), entry[2]
                for row, row_ids, n in zip(rows, ids, new, strict=True):
                    if n:
                        row.extend(row_ids[len(row_ids) - n :])
        return rows

    def free(self) -> None:
        """Release every row's blocks (registered prefix blocks stay reusable)."""
        _free_rows(self.manager, self._rows)
        self._fed.clear()
        self._seen = 0
        self._step = None
        self._base = self._history = None

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
        """Reserve this forward's slots (all layers) and build its block tables and lengths.

        With `gather`, `update` returns each layer's K/V as contiguous left-padded tensors for
        a model whose own attention code reads them (falcon, bloom, mpt: outside the registry).
        `input_ids` (`[batch, q_len]`), when known, feed the token record of `row_tokens`;
        `position_ids`, when known, are checked against the rows on multi-token steps.
        """
        if self._step is not None:
            raise RuntimeError("PagedCache: a forward pass is already in flight on this cache")
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
        real = self._real_tokens(attention_mask, q_len, expand)
        if position_ids is not None and q_len > 1:
            self._check_positions(position_ids, q_len, expand, real)
        # tokens each row appends: the real ones it does not hold yet (the window's last ones)
        new = [
            max(0, f + r - self.manager.seq_len(s))
            for s, f, r in zip(self._rows, self._fed, real, strict=True)
        ]
        parents = list(self._rows)
        slots = self._reserve(new, q_len, expand)

        fed = [f + r for f, r in zip(self._fed, real, strict=True)]
        self._fed[:] = [f for f in fed for _ in range(expand)]
        if self._history is not None:
            if input_ids is None or tuple(input_ids.shape) != (batch, q_len):
                self._history = None  # tokens unknown from here on: stop recording
            else:
                if expand > 1:
                    self._history.append(("perm", [i // expand for i in range(batch)]))
                self._history.append(("feed", input_ids, [n for n in new for _ in range(expand)]))
        device = slots.device
        self._step = _Step(
            slot_mapping=slots,
            block_tables=self.manager.block_tables(self._rows),
            seq_lens=self.manager.seq_lens(self._rows),
            query_start_loc=None
            if q_len == 1
            else torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=device),
            batch=batch,
            q_len=q_len,
            gather=gather,
            appended=(parents, new),
        )

    def _reserve(self, new: list[int], q_len: int, expand: int) -> torch.Tensor:
        """Append `new[i]` tokens to row i; with `expand`, fork each row into that many rows.

        Returns the slot mapping `[rows * expand * q_len]` (a row's new tokens are the last of
        its window; the rest and every fork's window are -1: the forks share the parent's
        blocks, this step's included). All or nothing: on error the rows are as before.
        """
        mgr, rows = self.manager, self._rows
        if expand == 1 and all(n == q_len for n in new):
            return mgr.append_batch(rows, q_len)  # the decode hot path; all or nothing itself
        appended: list[tuple[Hashable, int]] = []
        forked: list[Hashable] = []
        try:
            slots = torch.full(
                (len(rows), expand, q_len), -1, dtype=torch.int64, device=mgr.cache.pool.device
            )
            for i, (seq_id, n) in enumerate(zip(rows, new, strict=True)):
                if n:
                    old = mgr.seq_len(seq_id)
                    slots[i, 0, q_len - n :] = mgr.append(seq_id, n)
                    appended.append((seq_id, old))
            grown = []
            for seq_id in rows:
                grown.append(seq_id)
                for _ in range(expand - 1):
                    child = self._new_id()
                    mgr.fork(seq_id, child)
                    forked.append(child)
                    grown.append(child)
        except BaseException:
            for child in forked:
                mgr.free(child)
            for seq_id, old in appended:
                if mgr.seq_len(seq_id) > old:
                    mgr.forget_unwritten(seq_id, old)  # registered as reserved, never written
                    mgr.truncate(seq_id, old)
            raise
        rows[:] = grown
        return slots.view(-1)

    def _real_tokens(
        self, attention_mask: torch.Tensor | None, q_len: int, expand: int
    ) -> list[int]:
        """Real (non-pad) tokens in each row's window of `q_len` new columns."""
        n = len(self._rows)
        if attention_mask is None or q_len == 1:
            return [q_len] * n  # a decode step's new column is never padding
        if attention_mask.ndim != 2:
            raise ValueError(
                "pagedkv attention takes a 2-D padding mask [batch, length]; got a "
                f"{attention_mask.ndim}-D attention_mask"
            )
        window = attention_mask[::expand, -q_len:].to("cpu", torch.bool)
        if window.shape[1] < q_len:
            return [q_len] * n
        if bool((window[:, 1:] < window[:, :-1]).any()):
            raise ValueError(
                "pagedkv needs left padding (pads before the tokens); the attention_mask has "
                "a 0 after a 1. Use tokenizer.padding_side = 'left'."
            )
        return window.sum(1).tolist()

    def _check_positions(
        self, position_ids: torch.Tensor, q_len: int, expand: int, real: list[int]
    ) -> None:
        """Each row's first new real token must sit right after the real tokens fed so far.

        Catches a caller that feeds again tokens the cache holds (as a pre-filled cache given
        to a generate mode that ignores it would): that would be silently wrong otherwise.
        """
        if position_ids.ndim != 2 or position_ids.shape[-1] < q_len:
            return  # e.g. multimodal 3-D positions: not ours to interpret
        first = position_ids[:, -q_len:].to("cpu")
        if first.shape[0] == 1:
            first = first.expand(len(self._rows) * expand, -1)
        first = first[::expand]
        for b, (fed, r) in enumerate(zip(self._fed, real, strict=True)):
            if r and int(first[b, q_len - r]) != fed:
                raise RuntimeError(
                    f"row {b}: the forward's first new token has position "
                    f"{int(first[b, q_len - r])}, but the cache holds {fed} tokens of that row "
                    "(tokens fed again, or positions that do not follow the cache)"
                )

    def _count(self, step: _Step) -> None:
        """Add the step's columns to the length transformers sees.

        Like `DynamicCache`, whose length grows when layer 0 stores the step: before that
        (position ids, mask sizes) the model reads the past length, after it the new one.
        """
        if not step.counted:
            step.counted = True
            self._seen += step.q_len

    def end_forward(self) -> bool:
        """Close the step; returns whether every layer stored its K/V (False: it failed).

        A failed step's slots hold garbage in some layers: the blocks holding them leave the
        prefix cache (the manager registers a prompt's blocks as they are reserved), and the
        rows stop registering blocks. Other cached prefixes stay.
        """
        step = self._step
        if step is not None:
            self._count(step)
        self.last_step, self._step = step, None
        ok = step is None or len(step.written) == self.manager.config.num_layers
        if not ok:
            mgr = self.manager
            for seq_id, n in zip(*step.appended, strict=True):
                if n and seq_id in mgr:
                    mgr.forget_unwritten(seq_id, mgr.seq_len(seq_id) - n)
        return ok

    def _current(self) -> _Step:
        if self._step is None:
            raise RuntimeError(
                "PagedCache used outside a forward of a model prepared with "
                "enable_paged_attention (its forward pre-hook starts each step)"
            )
        return self._step

    # ---- transformers Cache API -----------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's K/V `[batch, kv_heads, q_len, head_dim]` into the blocks.

        Returns the inputs unchanged (pagedkv attention reads the blocks, not these). With
        `kwargs=` (transformers >= 5.24) the cache is handed to the attention function there.
        """
        step = self._current()
        batch, heads, q_len, head_dim = key_states.shape
        cfg = self.manager.config
        if (batch, q_len) != (step.batch, step.q_len) or (heads, head_dim) != (
            cfg.num_kv_heads,
            cfg.head_dim,
        ):
            raise ValueError(
                f"layer {layer_idx} K/V has [batch, kv_heads, q_len, head_dim] = "
                f"{list(key_states.shape)}; the cache expects [{step.batch}, {cfg.num_kv_heads}, "
                f"{step.q_len}, {cfg.head_dim}]"
            )
        dtype = cfg.torch_dtype
        key = key_states.transpose(1, 2).reshape(batch * q_len, heads, head_dim).to(dtype)
        value = value_states.transpose(1, 2).reshape(batch * q_len, heads, head_dim).to(dtype)
        self.manager.cache.write(layer_idx, key, value, step.slot_mapping)
        step.written.add(layer_idx)
        if layer_idx == 0:
            self._count(step)
        if step.gather:
            return self._gathered(layer_idx, step, key_states.dtype)
        model_kwargs = kwargs.get("kwargs")
        if isinstance(model_kwargs, dict):
            model_kwargs[CACHE_KWARG] = self
        return key_states, value_states

    def _gathered(
        self, layer_idx: int, step: _Step, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer K/V as `[batch, kv_heads, width, head_dim]`, each row's tokens right-aligned.

        `width` is the length transformers sees (pads included), so the model's own padding
        mask lines up: its pad columns are zeros here, its real columns are the row's tokens.
        """
        width = self._seen
        if step.gather_index is None:  # once per step, shared by all layers
            lens = step.seq_lens.to(torch.int64)
            pos = torch.arange(width, device=lens.device)
            rows = torch.arange(step.batch, device=lens.device)[:, None] * width
            step.gather_index = (rows + pos)[pos >= width - lens[:, None]]
        key, value = self.manager.cache.gather(layer_idx, step.block_tables, step.seq_lens)
        cfg = self.manager.config
        shape = (step.batch * width, cfg.num_kv_heads, cfg.head_dim)
        padded = []
        for packed in (key, value):
            out = packed.new_zeros(shape)
            out[step.gather_index] = packed
            out = out.view(step.batch, width, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            padded.append(out.to(dtype))
        return padded[0], padded[1]

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """`paged_attention` of packed queries `[batch * q_len, heads, head_dim]` on the blocks."""
        step = self._current()
        step.attended[layer_idx] = sliding_window
        out = self.manager.cache.attend(
            layer_idx,
            query.to(self.manager.config.torch_dtype),
            step.block_tables,
            step.seq_lens,
            scale=scale,
            query_start_loc=step.query_start_loc,
            causal=True,
            sliding_window=sliding_window,
            softcap=softcap,
        )
        return out.to(query.dtype)

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
        if self._history is not None:
            self._history.append(("perm", src))

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
        if self._history is not None:
            self._history.append(("crop", remove))

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
        if self._history is not None:
            self._history.append(("perm", picked))

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
