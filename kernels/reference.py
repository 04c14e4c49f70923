"""The four ops in pure torch: the CPU backend, and what the Triton kernels are tested against.

Same signatures as the public ops minus ``backend``/``config`` (argument types and shapes are
stated there, once); inputs are assumed valid (the public launchers check them). Everything is
vectorised over sequences and tokens: paged K/V are gathered with the block tables into padded
``[B, L, Hkv, D]`` tensors, and attention runs as a torch SDPA call with a boolean mask
(explicit fp32 scores for a softcap or attention sinks, which SDPA lacks).

Padding costs work, so a call splits where that is cheaper (a cost model, each call about
100 us on CPU): decodes of very different lengths run in a few batches of similar lengths, and
large prefills one call per row, which attends only the row's own keys and the queries that can
see one (a plain causal row lets SDPA skip the masked half); rows with the same blocks and
queries (beams of one prompt) are computed once.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _checks, _dispatch

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def write_kv(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Scatter key/value ``[T, Hkv, D]`` into caches ``[num_blocks, block_size, Hkv, D]`` at
    ``slot_mapping[t] = block * block_size + offset``; slot -1 is skipped."""
    _write_at(key, value, key_cache, value_cache, slot_index(slot_mapping, key_cache.shape[1]))


class SlotIndex(NamedTuple):
    """Where `write_kv` puts each token: what it derives from a slot mapping alone."""

    keep: torch.Tensor | None  # the tokens with a slot (not -1); None: all
    blocks: torch.Tensor  # int64 block of each kept token
    offsets: torch.Tensor  # int64 offset in its block


def slot_index(slot_mapping: torch.Tensor, block_size: int) -> SlotIndex:
    """The `SlotIndex` of a (valid) slot mapping: worked out once for the many layers that
    write through the same slots."""
    slots = slot_mapping.long()
    keep = None
    if slots.numel() and int(slots.min()) < 0:
        keep = (slots >= 0).nonzero().view(-1)
        slots = slots[keep]
    blocks = slots // block_size
    return SlotIndex(keep, blocks, slots - blocks * block_size)


def write_kv_at(key, value, key_cache, value_cache, index: SlotIndex) -> None:
    """`write_kv` at slots given as a `SlotIndex` of valid slots (nothing is checked), for a
    caller that writes many layers through the same slots (a step of the KV cache). Counts
    as a write_kv call on the torch backend for `trace_backends`."""
    _dispatch.record("write_kv", "torch")
    _write_at(key, value, key_cache, value_cache, index)


def _write_at(key, value, key_cache, value_cache, index: SlotIndex) -> None:
    if index.keep is not None:
        key, value = key.index_select(0, index.keep), value.index_select(0, index.keep)
    if key.dtype != key_cache.dtype:
        key, value = key.to(key_cache.dtype), value.to(value_cache.dtype)
    key_cache.index_put_((index.blocks, index.offsets), key)
    value_cache.index_put_((index.blocks, index.offsets), value)


def copy_blocks(key_caches, value_caches, block_mapping) -> None:
    """In every layer copy block ``block_mapping[i, 0]`` to ``block_mapping[i, 1]`` (``[N, 2]``)."""
    src, dst = block_mapping[:, 0].long(), block_mapping[:, 1].long()
    for key_cache, value_cache in zip(key_caches, value_caches, strict=True):
        key_cache[dst] = key_cache[src]
        value_cache[dst] = value_cache[src]


def gather_kv(key_cache, value_cache, block_tables, seq_lens) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged -> contiguous: key, value ``[sum(seq_lens), Hkv, D]`` packed in sequence order."""
    block_size = key_cache.shape[1]
    seq_lens = seq_lens.long()
    device = key_cache.device
    total = int(seq_lens.sum())
    seq_idx = torch.repeat_interleave(
        torch.arange(len(seq_lens), device=device), seq_lens, output_size=total
    )
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    pos = torch.arange(total, device=device) - starts[seq_idx]
    blocks = block_tables[seq_idx, pos // block_size].long()
    offsets = pos % block_size
    return key_cache[blocks, offsets], value_cache[blocks, offsets]


def _gather_padded(
    cache: torch.Tensor,
    block_ids: torch.Tensor,
    lengths: list[int],
    max_len: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, Hkv, max_len, D]`` view of a fresh copy of each sequence's keys (or values).

    block_ids: ``[B, nb]`` int64, the first ``nb = cdiv(max_len, block_size)`` table columns.
    Whole blocks are gathered along dim 0: each block of a strided per-layer pool view is one
    contiguous span, so this costs O(blocks gathered) (indexing another dim of the view would
    walk the whole pool). The result is a transposed view (rows ``Hkv * D`` apart): CPU SDPA
    reads it about as fast as a contiguous copy, which would cost more than it saves. The slots
    past each sequence's length (``lengths``), and those where ``valid`` ``[B, max_len]`` is
    False if given, are zeroed, so stale data (even NaN) there cannot leak into the result.
    """
    num_seqs, num_blocks = block_ids.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    blocks = _block_rows(cache).index_select(0, block_ids.reshape(-1))  # [B * nb, bs * Hkv * D]
    blocks = blocks.view(-1, block_size, num_kv_heads, head_dim)
    padded = blocks.view(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)[:, :max_len]
    if valid is not None:
        padded.masked_fill_(~valid[:, :, None, None], 0)
        return padded.transpose(1, 2)
    # One memset per shorter sequence over its tail rows (contiguous here): measured several
    # times cheaper than an indexed or masked write, which touches every row or element.
    for i, length in enumerate(lengths):
        if length < max_len:
            padded[i, length:].zero_()
    return padded.transpose(1, 2)


def _rows_contiguous(cache: torch.Tensor) -> bool:
    """Whether each block of a `[num_blocks, bs, Hkv, D]` view is one contiguous span."""
    _, block_size, num_kv_heads, head_dim = cache.shape
    return cache.stride()[1:] == (num_kv_heads * head_dim, head_dim, 1)


def paged_attention(query, key_cache, value_cache, block_tables, seq_lens, *, scale,
                    query_start_loc=None, causal=True, sliding_window=None, softcap=None,
                    sinks=None, slot_valid=None, out=None) -> torch.Tensor:  # fmt: skip
    """Attention of packed queries ``[T, Hq, D]`` over paged K/V; returns ``[T, Hq, D]``.

    Sequence i's queries are its last q_len_i tokens: query j sits at position
    ``seq_len_i - q_len_i + j``. Keys whose slot is False in ``slot_valid`` (if given) are not
    attended. ``sinks`` ``[Hq]``: one more logit per head in each row's softmax, its probability
    dropped. A query that sees no key outputs zeros. With a sliding window, a sequence's keys
    are gathered from the first block its first query's window reaches: the table entries
    before it are never read (they may be -1).
    """
    num_seqs = seq_lens.shape[0]
    block_size = key_cache.shape[1]
    seq_lens = seq_lens.long()
    kwargs = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                  slot_valid=slot_valid)  # fmt: skip
    if query_start_loc is not None:
        q_lens = query_start_loc[1:].long() - query_start_loc[:-1]
        if num_seqs > 1:
            split = _split_mixed(q_lens)
            if split is not None:
                return _attend_split(
                    split, query, key_cache, value_cache, block_tables, seq_lens,
                    query_start_loc, q_lens, out, dict(kwargs, causal=causal),
                )  # fmt: skip
    # Keys of sequence i are gathered from position first_key[i] on (0 without a window).
    first_col = _checks.first_block_read(
        seq_lens, query_start_loc, sliding_window=sliding_window, block_size=block_size
    )
    kv_lens = seq_lens if first_col is None else seq_lens - first_col * block_size
    lengths = kv_lens.tolist()  # one sync; decode steps are latency-bound on CPU
    if query_start_loc is None:
        return _decode(
            query, key_cache, value_cache, block_tables, seq_lens, first_col, kv_lens, lengths,
            out=out, **kwargs,
        )  # fmt: skip
    q_len_list = q_lens.tolist()
    if num_seqs > 1:
        rows = _rows_apart(query, block_tables, seq_lens.tolist(), lengths, q_len_list, causal)
        if rows is not None:
            return _attend_rows(
                rows, query, key_cache, value_cache, block_tables, seq_lens, first_col,
                kv_lens, lengths, q_len_list, causal=causal, out=out, **kwargs,
            )  # fmt: skip
    return _attend_padded(
        query, key_cache, value_cache, block_tables, seq_lens, first_col, kv_lens, lengths,
        q_len_list, causal=causal, out=out, **kwargs,
    )  # fmt: skip


# What one more attention call costs beyond its work, in query-key pairs x query heads x
# head_dim: the launch of its gathers, mask and attention. Measured on CPU (1 thread): a call
# costs about 100 us more, a query-key pair of one head about 3.5 ns at head_dim 64.
_CALL_COST = 2 * 1024 * 1024


def _rows_apart(query, block_tables, seq_len_list, lengths, q_len_list, causal):
    """Whether rows with queries (prefill) run one attention call each, and which: None (one
    padded call is cheaper), else (first row, row of the same output or None) per row.

    A call of its own pads nothing: a row attends only its own keys and its queries that can
    see one (with `causal`, none before position 0), and a plain causal row skips the masked
    half. Rows with the same lengths, block table and queries (beams that a prompt's forward
    expanded, before they part) have the same output: it is computed once."""
    num_seqs = len(lengths)
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    max_q, max_len = max(q_len_list), max(lengths)
    padded = num_seqs * max_q * max_len
    if padded * num_q_heads * head_dim < num_seqs * _CALL_COST:
        return None  # too little work to win back a call per row
    starts = [0]
    for n in q_len_list:
        starts.append(starts[-1] + n)
    twin_of: list[int | None] = [None] * num_seqs
    first_of: dict[tuple[int, int], int] = {}
    apart = calls = 0
    for i, (seq_len, q_len, kv_len) in enumerate(zip(seq_len_list, q_len_list, lengths)):
        key = (seq_len, q_len)
        j = first_of.setdefault(key, i)
        if (
            j != i
            and torch.equal(block_tables[i], block_tables[j])
            and torch.equal(query[starts[i] : starts[i + 1]], query[starts[j] : starts[j + 1]])
        ):
            twin_of[i] = j
            continue
        seen = min(q_len, seq_len) if causal else q_len
        apart += seen * kv_len // (2 if causal and seen == kv_len else 1)
        calls += 1
    if apart + calls * _CALL_COST / (num_q_heads * head_dim) >= padded:
        return None
    return twin_of


def _attend_rows(twin_of, query, key_cache, value_cache, block_tables, seq_lens, first_col,
                 kv_lens, lengths, q_len_list, *, causal, out, **kwargs) -> torch.Tensor:  # fmt: skip
    """`paged_attention` of rows with queries, one call per row (see `_rows_apart`)."""
    result = torch.empty_like(query) if out is None else out
    seq_len_list = seq_lens.tolist()
    start = 0
    starts = []
    for i, q_len in enumerate(q_len_list):
        starts.append(start)
        stop = start + q_len
        twin = twin_of[i]
        if twin is not None:
            result[start:stop] = result[starts[twin] : starts[twin] + q_len]
        else:
            # With causal, the queries before position 0 see no key: they are zeros.
            skip = max(0, q_len - seq_len_list[i]) if causal else 0
            if skip:
                result[start : start + skip].zero_()
            if skip < q_len:
                row = slice(i, i + 1)
                _attend_padded(
                    query[start + skip : stop], key_cache, value_cache, block_tables[row],
                    seq_lens[row], None if first_col is None else first_col[row], kv_lens[row],
                    lengths[row], [q_len - skip], causal=causal, out=result[start + skip : stop],
                    **kwargs,
                )  # fmt: skip
        start = stop
    return result


def _attend_padded(query, key_cache, value_cache, block_tables, seq_lens, first_col, kv_lens,
                   lengths, q_len_list, *, scale, causal, sliding_window, softcap, sinks,
                   slot_valid, out) -> torch.Tensor:  # fmt: skip
    """`paged_attention` of rows with query_start_loc (prefill, prefill over a cached prefix):
    every row padded to the longest query count and key count, one attention call."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_seqs = len(lengths)
    device = query.device
    block_size = key_cache.shape[1]
    max_len = max(lengths, default=0)
    if num_tokens == 0 or max_len == 0:
        return torch.zeros_like(query) if out is None else out.zero_()

    # Keys: [B, Hkv, L, D], zeroed past each sequence's end when lengths differ, and at
    # invalid slots. k_pos: [1 or B, L] the position of each gathered key.
    k_pos, key_valid, block_ids = _key_layout(
        block_tables, first_col, kv_lens, lengths, max_len, block_size, device
    )
    if slot_valid is not None:
        slots_ok = _slots_ok(slot_valid, block_ids, max_len)
        key_valid = slots_ok if key_valid is None else key_valid & slots_ok
    holes = key_valid if slot_valid is not None else None
    keys = _gather_padded(key_cache, block_ids, lengths, max_len, holes)
    values = _gather_padded(value_cache, block_ids, lengths, max_len, holes)

    # Queries: [B, Hq, M, D]; mask: None (all visible) or bool, broadcastable to [B, M, L].
    mask = None if key_valid is None else key_valid[:, None, :]
    is_causal = False  # SDPA's own (top-left) causal mask: right when every query is a key
    max_q = max(q_len_list)
    rows = torch.arange(max_q, device=device)
    if num_seqs == 1:
        padded_q = query[None]
        row_valid = None
        q_pos = (seq_lens - max_q)[:, None] + rows  # [1, M]
    else:
        q_lens = torch.tensor(q_len_list, device=device)
        row_valid = rows < q_lens[:, None]  # [B, M]
        padded_q = query.new_zeros(num_seqs, max_q, num_q_heads, head_dim)
        padded_q[row_valid] = query
        q_pos = (seq_lens - q_lens)[:, None] + rows  # [B, M]
    q = padded_q.transpose(1, 2)
    plain_prefill = key_valid is None and all(n == max_len for n in q_len_list)
    if causal and plain_prefill and sliding_window is None and softcap is None and sinks is None:
        is_causal = True
    elif causal:
        visible = k_pos[:, None, :] <= q_pos[:, :, None]
        mask = visible if mask is None else mask & visible
    if sliding_window is not None:
        in_window = q_pos[:, :, None] - k_pos[:, None, :] < sliding_window
        mask = in_window if mask is None else mask & in_window

    o = _attention(q, keys, values, mask, scale=scale, is_causal=is_causal, softcap=softcap,
                   sinks=sinks)  # fmt: skip
    o = o.transpose(1, 2)  # [B, M, Hq, D]

    # Rows that see no key (q_len > seq_len left padding, empty sequences) are exactly 0.
    if mask is not None:
        sees_any = mask.expand(num_seqs, o.shape[1], max_len).any(-1)  # [B, M]
        if not bool(sees_any.all()):
            o = torch.where(sees_any[:, :, None, None], o, 0)
    o = o.reshape(num_tokens, num_q_heads, head_dim) if num_seqs == 1 else o[row_valid]
    if out is None:
        return o
    return out.copy_(o)


def _decode(query, key_cache, value_cache, block_tables, seq_lens, first_col, kv_lens,
            lengths, *, out, scale, sliding_window, softcap, sinks, slot_valid) -> torch.Tensor:  # fmt: skip
    """`paged_attention` of one query per sequence (see `plan_decode`)."""
    plan = _plan_decode(block_tables, seq_lens, first_col, lengths, key_cache,
                        sliding_window=sliding_window, slot_valid=slot_valid,
                        share=softcap is None and sinks is None)  # fmt: skip
    return _attend_decode(plan, query, key_cache, value_cache, scale=scale, softcap=softcap,
                          sinks=sinks, out=out)  # fmt: skip


class _DecodeBatch(NamedTuple):
    """One padded batch of a `DecodePlan`: rows `rows` of the plan's order."""

    rows: slice
    block_ids: torch.Tensor  # [B * cdiv(max_len, block_size)] the blocks gathered, row by row
    lengths: list[int]  # keys gathered per row (from the first block its window reaches)
    max_len: int
    mask: torch.Tensor | None  # [B, 1, 1, max_len] keys seen; None: every key gathered
    hidden: torch.Tensor | None  # [B, max_len, 1, 1] invalid slots to zero; None: tails only
    sees_any: torch.Tensor | None  # [B, 1, 1]: rows that see some key, when one sees none
    additive: torch.Tensor | None  # `mask` as 0 / -inf, for a plan with a shared prefix


class DecodePlan(NamedTuple):
    """What a decode `paged_attention` derives from its block tables and lengths alone (see
    `plan_decode`)."""

    perm: torch.Tensor | None  # the rows by length, longest first; None: as given
    batches: tuple[_DecodeBatch, ...]  # over the keys after the shared prefix
    cache_shape: torch.Size  # [num_blocks, block_size, Hkv, D]
    shared: torch.Tensor | None  # blocks every row starts with (beams of one prompt), or None


def plan_decode(block_tables, seq_lens, key_cache, *, sliding_window=None, slot_valid=None,
                share=True) -> DecodePlan:  # fmt: skip
    """The layout of a decode `paged_attention` (one query per sequence) over valid tables:
    worked out once for the layers of a step, which share their tables and lengths (and
    windows, and slot validity); `attend_decode` then runs one layer's attention.

    Rows of very different lengths run in a few batches of similar lengths (`_decode_batches`),
    each padded only to its own longest. The plan keeps the blocks each batch gathers and the
    mask of the keys each row sees. With `share` (attention without softcap or sinks, no
    window, no invalid slots, on CPU), blocks that every row's table starts with (beams of one
    prompt) are gathered and attended once for all rows' queries, and merged with each row's
    own keys by their log-sum-exp."""
    seq_lens = seq_lens.long()
    first_col = _checks.first_block_read(
        seq_lens, None, sliding_window=sliding_window, block_size=key_cache.shape[1]
    )
    kv_lens = seq_lens if first_col is None else seq_lens - first_col * key_cache.shape[1]
    return _plan_decode(block_tables, seq_lens, first_col, kv_lens.tolist(), key_cache,
                        sliding_window=sliding_window, slot_valid=slot_valid,
                        share=share)  # fmt: skip


def attend_decode(plan: DecodePlan, query, key_cache, value_cache, *, scale, softcap=None,
                  sinks=None, out=None) -> torch.Tensor:  # fmt: skip
    """`paged_attention` of one layer through a `plan_decode` plan (nothing is checked).
    Counts as a paged_attention call on the torch backend for `trace_backends`."""
    _dispatch.record("paged_attention", "torch")
    return _attend_decode(plan, query, key_cache, value_cache, scale=scale, softcap=softcap,
                          sinks=sinks, out=out)  # fmt: skip


def _plan_decode(block_tables, seq_lens, first_col, lengths, key_cache, *, sliding_window,
                 slot_valid, share) -> DecodePlan:  # fmt: skip
    cache_shape = key_cache.shape
    num_blocks, block_size, num_kv_heads, head_dim = cache_shape
    device = block_tables.device
    shared = None
    if share and first_col is None and slot_valid is None and device.type == "cpu":
        shared = _shared_prefix(block_tables, lengths, block_size, num_kv_heads * head_dim)
        if shared is not None:  # the batches attend each row's keys after it
            block_tables = block_tables[:, shared.shape[0] :]
            lengths = [n - shared.shape[0] * block_size for n in lengths]
    order, bounds = _decode_batches(
        tuple(lengths), num_kv_heads * head_dim, _BATCH_COST_ELEMENTS, _MAX_BATCHES
    )
    perm = None
    if order is not None:  # rows by length: each batch is a slice
        perm = torch.tensor(order, device=device)
        block_tables = block_tables.index_select(0, perm)
        if first_col is not None:
            first_col, seq_lens = first_col.index_select(0, perm), seq_lens.index_select(0, perm)
        lengths = [lengths[i] for i in order]
    batches = []
    for start, stop in bounds:
        rows = slice(start, stop)
        batch_lengths = lengths[rows]
        num_seqs, max_len = stop - start, max(batch_lengths)
        num_cols = -(-max_len // block_size)
        if first_col is None:
            block_ids = block_tables[rows, :num_cols]
        else:  # keys from the first block the window reaches; entries before are never read
            cols = first_col[rows, None] + torch.arange(num_cols, device=device)
            block_ids = block_tables[rows].gather(1, cols.clamp(max=block_tables.shape[1] - 1))
        ragged = min(batch_lengths) < max_len
        if ragged:  # entries past a shorter row's blocks may hold anything: its keys there are 0
            block_ids = block_ids.clamp(0, num_blocks - 1)
        block_ids = block_ids.reshape(-1)
        mask = hidden = sees_any = None  # mask: [B, L] the keys each row sees, None for all
        if ragged:
            lens = torch.tensor(batch_lengths, device=device)
            mask = torch.arange(max_len, device=device) < lens[:, None]
        if slot_valid is not None:
            slots_ok = slot_valid.index_select(0, block_ids).view(num_seqs, -1)[:, :max_len]
            mask = slots_ok.bool() if mask is None else mask & slots_ok.bool()
            hidden = ~mask[:, :, None, None]  # stale data, even NaN, there must not leak
        if first_col is not None:
            k_pos = first_col[rows, None] * block_size + torch.arange(max_len, device=device)
            in_window = (seq_lens[rows] - 1)[:, None] - k_pos < sliding_window
            mask = in_window if mask is None else mask & in_window
        # A row that holds a key sees its last one: only invalid slots or an empty row can
        # hide every key; such rows come out exactly 0.
        if slot_valid is not None or (max_len and min(batch_lengths) == 0):
            seen = mask.any(-1)
            if not bool(seen.all()):
                sees_any = seen[:, None, None]
        batch_mask = additive = None
        if mask is not None:
            batch_mask = mask[:, None, None]
            if shared is not None:
                additive = torch.zeros(batch_mask.shape, dtype=key_cache.dtype, device=device)
                additive.masked_fill_(~batch_mask, float("-inf"))
        batches.append(_DecodeBatch(rows, block_ids, batch_lengths, max_len, batch_mask,
                                    hidden, sees_any, additive))  # fmt: skip
    return DecodePlan(perm, tuple(batches), cache_shape, shared)


# SDPA on CPU that also returns each query row's log-sum-exp (what merging the attention over
# a shared prefix with a row's own keys needs); None where this torch lacks it.
_ATTEND_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# Keys a shared prefix must save (rows - 1 times its key rows x KV heads x head_dim) to be
# attended apart: its attention call and the merge cost about two decode batches.
_SHARE_MIN_ELEMENTS = 128 * 1024


def _shared_prefix(block_tables, lengths, block_size, row_elements) -> torch.Tensor | None:
    """The leading blocks every row's table holds (beams of one prompt share its blocks), when
    attending them once saves enough (`_SHARE_MIN_ELEMENTS`); each row keeps at least one key
    of its own. None otherwise."""
    num_seqs = len(lengths)
    cols = (min(lengths) - 1) // block_size  # full blocks before every row's last key
    if _ATTEND_LSE is None or num_seqs < 2 or cols <= 0:
        return None
    if (num_seqs - 1) * cols * block_size * row_elements < _SHARE_MIN_ELEMENTS:
        return None
    same = (block_tables[:, :cols] == block_tables[:1, :cols]).all(0)
    shared = int(same.int().cumprod(0).sum())
    if shared == 0 or (num_seqs - 1) * shared * block_size * row_elements < _SHARE_MIN_ELEMENTS:
        return None
    return block_tables[0, :shared]


def _attend_decode(plan, query, key_cache, value_cache, *, scale, softcap, sinks,
                   out) -> torch.Tensor:  # fmt: skip
    """One layer through a decode plan. A decode step runs this once per layer, with the model's
    own work in between (which evicts the CPU caches): few Python calls per batch."""
    _, block_size, num_kv_heads, head_dim = plan.cache_shape
    key_rows, value_rows = _block_rows(key_cache), _block_rows(value_cache)
    if plan.perm is None:
        result = torch.empty_like(query) if out is None else out
    else:
        query = query.index_select(0, plan.perm)
        result = torch.empty_like(query)
    num_q_heads = query.shape[1]
    group = num_q_heads // num_kv_heads
    if plan.shared is not None:  # every row's queries over the shared blocks at once
        num_seqs, shared_len = query.shape[0], plan.shared.shape[0] * block_size
        shape = (1, shared_len, num_kv_heads, head_dim)
        keys = key_rows.index_select(0, plan.shared).view(shape).transpose(1, 2)
        values = value_rows.index_select(0, plan.shared).view(shape).transpose(1, 2)
        q = query.view(num_seqs, num_kv_heads, group, head_dim).transpose(0, 1)
        q = q.reshape(1, num_kv_heads, num_seqs * group, head_dim)
        shared_out, shared_lse = _ATTEND_LSE(q, keys, values, 0.0, False, scale=scale)
        shared_out = shared_out.view(num_kv_heads, num_seqs, group, head_dim).transpose(0, 1)
        shared_lse = shared_lse.view(num_kv_heads, num_seqs, group).transpose(0, 1)
    for batch in plan.batches:
        num_seqs, max_len = len(batch.lengths), batch.max_len
        if max_len == 0:
            result[batch.rows] = 0
            continue
        shape = (num_seqs, batch.block_ids.shape[0] // num_seqs * block_size, num_kv_heads,
                 head_dim)  # fmt: skip
        keys = key_rows.index_select(0, batch.block_ids).view(shape)[:, :max_len]
        values = value_rows.index_select(0, batch.block_ids).view(shape)[:, :max_len]
        if batch.hidden is not None:
            keys.masked_fill_(batch.hidden, 0)
            values.masked_fill_(batch.hidden, 0)
        elif batch.mask is not None:  # one memset per shorter row over its tail
            for i, length in enumerate(batch.lengths):
                if length < max_len:
                    keys[i, length:].zero_()
                    values[i, length:].zero_()
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, L, D]
        q = query[batch.rows]
        if softcap is not None or sinks is not None:
            mask = None if batch.mask is None else batch.mask[:, 0]
            o = _eager_attention(q[:, :, None], keys, values, mask, scale=scale,
                                 softcap=softcap, sinks=sinks)  # fmt: skip
        else:
            # The query heads that share a KV head as the query rows of one attention (what
            # transformers' SDPA path does for one-token steps): no K/V repeat or broadcast.
            q = q.reshape(num_seqs, num_kv_heads, group, head_dim)
            if plan.shared is None:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.mask,
                                                   scale=scale)  # fmt: skip
            else:
                o, lse = _ATTEND_LSE(q, keys, values, 0.0, False, attn_mask=batch.additive,
                                     scale=scale)  # fmt: skip
                o = _merge(shared_out[batch.rows], shared_lse[batch.rows], o, lse)
        o = o.reshape(num_seqs, num_q_heads, head_dim)
        if batch.sees_any is not None:
            o = torch.where(batch.sees_any, o, 0)
        result[batch.rows] = o
    if plan.perm is None:
        return result
    return (torch.empty_like(query) if out is None else out).index_copy_(0, plan.perm, result)


def _merge(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """Attention over keys A and B from attention over each (outputs `[..., D]`, log-sum-exps
    `[...]` of their scaled scores): the softmax weights of the two parts, renormalised."""
    top = torch.maximum(lse_a, lse_b)
    weight_a, weight_b = (lse_a - top).exp_()[..., None], (lse_b - top).exp_()[..., None]
    merged = (out_a.float() * weight_a + out_b.float() * weight_b) / (weight_a + weight_b)
    return merged.to(out_b.dtype)


def _block_rows(cache: torch.Tensor) -> torch.Tensor:
    """`cache` `[num_blocks, bs, Hkv, D]` with each block as one row, when each block is one
    contiguous span: index_select copies whole rows then, several times faster on CPU than
    over the 4-d view of a strided pool (measured 7x for a 30-layer pool)."""
    return cache.flatten(1) if _rows_contiguous(cache) else cache


def _key_layout(block_tables, first_col, kv_lens, lengths, max_len, block_size, device):
    """Where a padded batch's keys come from: k_pos ``[1 or B, L]`` the position of each
    gathered key; key_valid ``[B, L]`` (None when every row has `max_len` keys); block_ids
    ``[B, cdiv(L, block_size)]`` the table entries gathered."""
    k_pos = torch.arange(max_len, device=device)[None]
    ragged = min(lengths) < max_len
    key_valid = k_pos < kv_lens[:, None] if ragged else None  # [B, L]
    num_cols = -(-max_len // block_size)
    if first_col is None:
        block_ids = block_tables[:, :num_cols].long()
    else:
        cols = first_col[:, None] + torch.arange(num_cols, device=device)
        block_ids = block_tables.gather(1, cols.clamp(max=block_tables.shape[1] - 1)).long()
        k_pos = first_col[:, None] * block_size + k_pos
    if ragged:  # entries past a shorter row's blocks are never read: any value may sit there
        cols = torch.arange(num_cols, device=device)
        block_ids = block_ids.where(cols < (kv_lens[:, None] + block_size - 1) // block_size, 0)
    return k_pos, key_valid, block_ids


def _slots_ok(slot_valid, block_ids, max_len):
    """``[B, L]`` bool: whether each gathered key's slot is valid."""
    num_seqs = block_ids.shape[0]
    slots_ok = slot_valid.index_select(0, block_ids.reshape(-1)).view(num_seqs, -1)
    return slots_ok[:, :max_len].bool()


def _attention(q, keys, values, mask, *, scale, is_causal, softcap, sinks):
    """q ``[B, Hq, M, D]`` over keys/values ``[B, Hkv, L, D]``: SDPA, or explicit scores for a
    softcap or sinks."""
    if softcap is not None or sinks is not None:
        return _eager_attention(q, keys, values, mask, scale=scale, softcap=softcap, sinks=sinks)
    attn_mask = None if mask is None else mask[:, None]
    num_q_heads, num_kv_heads = q.shape[1], keys.shape[1]
    if num_q_heads != num_kv_heads and not _SDPA_HAS_GQA:
        group = num_q_heads // num_kv_heads
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    gqa = {"enable_gqa": True} if num_q_heads != keys.shape[1] else {}
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **gqa
    )


# What one more decode batch costs beyond its keys, in gathered key elements (key rows x KV
# heads x head_dim): the launch of its gathers, mask and attention. Measured on CPU (1 thread): a
# batch costs about 60 us more, a gathered and attended key element about 0.9 ns.
_BATCH_COST_ELEMENTS = 64 * 1024
_MAX_BATCHES = 4


@functools.lru_cache(maxsize=8)  # a decode step asks once per layer, with the same lengths
def _decode_batches(
    lengths: tuple[int, ...],
    row_elements: int,
    batch_cost: int = _BATCH_COST_ELEMENTS,
    max_batches: int = _MAX_BATCHES,
) -> tuple[tuple[int, ...] | None, tuple[tuple[int, int], ...]]:
    """Decodes of very different lengths as a few batches of similar lengths: (the rows by
    length, longest first; each batch's bounds in that order) when that costs less (keys padded
    to each batch's longest, plus `batch_cost` per batch) than one batch padded to the longest;
    else (None, one batch of every row in the given order). Candidates: 2..`max_batches`
    batches of equal counts, or cut at the largest drops in length."""
    num = len(lengths)
    one = (None, ((0, num),))
    if num < 2:
        return one
    order = sorted(range(num), key=lengths.__getitem__, reverse=True)
    ordered = [lengths[i] for i in order]
    fixed = batch_cost / max(row_elements, 1)  # a batch, in key rows

    def cost(cuts: list[int]) -> float:
        bounds = [0, *cuts, num]
        return sum(fixed + ordered[a] * (b - a) for a, b in zip(bounds, bounds[1:]))

    best, best_cost = None, cost([])
    drops = sorted(range(1, num), key=lambda i: ordered[i - 1] - ordered[i], reverse=True)
    for k in range(2, min(max_batches, num) + 1):
        size = -(-num // k)
        for cuts in (list(range(size, num, size)), sorted(drops[: k - 1])):
            c = cost(cuts)
            if c < best_cost:
                best, best_cost = cuts, c
    if best is None:
        return one
    bounds = [0, *best, num]
    return tuple(order), tuple(zip(bounds, bounds[1:]))


def _split_mixed(q_lens: torch.Tensor) -> torch.Tensor | None:
    """The one-query rows of a call that mixes them with long ones (a continuous-batching
    step: decodes beside prompt chunks), when padding every row to the longest would waste
    most of the work; None otherwise."""
    single = q_lens == 1
    num_single = int(single.sum())
    if num_single == 0 or num_single == len(q_lens):
        return None
    if len(q_lens) * int(q_lens.max()) <= 2 * int(q_lens.sum()):
        return None
    return single


def _attend_split(single, query, key_cache, value_cache, block_tables, seq_lens,
                  query_start_loc, q_lens, out, kwargs) -> torch.Tensor:  # fmt: skip
    """`paged_attention` as two calls: the one-query rows as a decode, the others packed."""
    starts = query_start_loc[:-1].long()
    decode_at = starts[single]
    multi = ~single
    multi_lens = q_lens[multi]
    multi_loc = torch.zeros(len(multi_lens) + 1, dtype=query_start_loc.dtype, device=query.device)
    multi_loc[1:] = torch.cumsum(multi_lens, 0)
    multi_at = torch.repeat_interleave(
        starts[multi] - multi_loc[:-1].long(), multi_lens, output_size=int(multi_loc[-1])
    ) + torch.arange(int(multi_loc[-1]), device=query.device)
    result = torch.empty_like(query) if out is None else out
    result[decode_at] = paged_attention(
        query[decode_at], key_cache, value_cache, block_tables[single], seq_lens[single], **kwargs
    )
    result[multi_at] = paged_attention(
        query[multi_at], key_cache, value_cache, block_tables[multi], seq_lens[multi],
        query_start_loc=multi_loc, **kwargs,
    )  # fmt: skip
    return result


def _eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    max_scores: int = 1 << 24,
) -> torch.Tensor:
    """Attention with explicit scores, for what SDPA lacks: Gemma-2 logit softcapping and
    gpt-oss attention sinks (a logit ``sinks[h]`` per query head joins each row's softmax, its
    probability dropped). In fp32 (float64 for float64 inputs). q ``[B, Hq, M, D]``, k/v
    ``[B, Hkv, L, D]``, mask None or broadcastable to ``[B, M, L]``; returns ``[B, Hq, M, D]``
    (rows with no visible key are NaN, or 0 with sinks). Query rows go in chunks of at most
    `max_scores` scores (64 MB in fp32), so a long prompt does not materialise all
    B x Hq x M x L scores at once."""
    batch, num_q_heads, rows, head_dim = q.shape
    num_kv_heads, keys = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dtype).reshape(batch, num_kv_heads, group, rows, head_dim)
    kt = k.to(dtype)[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, D, L]
    vf = v.to(dtype)[:, :, None]  # [B, Hkv, 1, L, D]
    if sinks is not None:  # [1, Hkv, G, 1, 1]: query head h = kv head * G + its index in G
        sinks = sinks.to(dtype).reshape(1, num_kv_heads, group, 1, 1)
    out = torch.empty(batch, num_kv_heads, group, rows, head_dim, dtype=dtype, device=q.device)
    chunk = max(1, max_scores // max(1, batch * num_q_heads * keys))
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        scores = qg[:, :, :, start:stop] @ kt * scale  # [B, Hkv, G, chunk, L]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if mask is not None:
            rows_mask = mask[:, start:stop] if mask.shape[1] > 1 else mask
            scores = scores.masked_fill(~rows_mask[:, None, None], float("-inf"))
        if sinks is None:
            probs = torch.softmax(scores, dim=-1)
        else:  # softmax over the keys and the sink, the sink's column dropped
            sink_col = sinks.expand(*scores.shape[:-1], 1)
            probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
        out[:, :, :, start:stop] = probs @ vf
    return out.reshape(batch, num_q_heads, rows, head_dim).to(q.dtype)
