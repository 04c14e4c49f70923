"""The four ops in pure torch: the CPU backend, and what the Triton kernels are tested against.

Same signatures as the public ops minus ``backend``/``config``; inputs are assumed valid (the
public launchers check them). Everything is vectorised over sequences and tokens: paged K/V are
gathered with the block tables into padded ``[B, L, Hkv, D]`` tensors, and attention runs as one
torch SDPA call with a boolean mask (manual fp32 scores when a softcap is set, which SDPA lacks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter key/value ``[T, Hkv, D]`` into caches ``[num_blocks, block_size, Hkv, D]`` at
    ``slot_mapping[t] = block * block_size + offset``; slot -1 is skipped."""
    block_size = key_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key.to(key_cache.dtype)
    value_cache[blocks, offsets] = value.to(value_cache.dtype)


def copy_blocks(
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """In every layer copy block ``block_mapping[i, 0]`` to ``block_mapping[i, 1]`` (``[N, 2]``)."""
    src, dst = block_mapping[:, 0].long(), block_mapping[:, 1].long()
    for key_cache, value_cache in zip(key_caches, value_caches, strict=True):
        key_cache[dst] = key_cache[src]
        value_cache[dst] = value_cache[src]


def gather_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    cache: torch.Tensor, block_tables: torch.Tensor, max_len: int, key_valid: torch.Tensor | None
) -> torch.Tensor:
    """``[B, max_len, Hkv, D]`` copy of each sequence's keys (or values); slots past a
    sequence's length are zeroed so stale data (even NaN) in unused slots cannot leak."""
    block_size = cache.shape[1]
    num_blocks = -(-max_len // block_size)
    padded = cache[block_tables[:, :num_blocks].long()]  # [B, nb, bs, Hkv, D]
    padded = padded.flatten(1, 2)[:, :max_len]
    if key_valid is not None:
        padded.masked_fill_(~key_valid[:, :, None, None], 0)
    return padded


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    query_start_loc: torch.Tensor | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed queries ``[T, Hq, D]`` over paged K/V; returns ``[T, Hq, D]``.

    Sequence i's queries are its last q_len_i tokens: query j sits at position
    ``seq_len_i - q_len_i + j``. A query that sees no key outputs zeros.
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = key_cache.shape[2]
    device = query.device
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out.zero_()

    seq_lens = seq_lens.long()
    if query_start_loc is None:
        q_lens = torch.ones_like(seq_lens)
        max_q = 1
        q = query[:, None]  # [B, 1, Hq, D]
        q_row_valid = None
    else:
        starts = query_start_loc.long()
        q_lens = starts[1:] - starts[:-1]
        max_q = int(q_lens.max())
        q_row_valid = torch.arange(max_q, device=device) < q_lens[:, None]  # [B, max_q]
        if num_seqs == 1:
            q = query[None]
            q_row_valid = None
        else:
            q = query.new_zeros(num_seqs, max_q, num_q_heads, head_dim)
            q[q_row_valid] = query

    max_len = max(int(seq_lens.max()), 1)
    k_pos = torch.arange(max_len, device=device)
    key_valid = k_pos < seq_lens[:, None]  # [B, L]
    all_full = bool(key_valid.all())
    keys = _gather_padded(key_cache, block_tables, max_len, None if all_full else key_valid)
    values = _gather_padded(value_cache, block_tables, max_len, None if all_full else key_valid)

    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=device)  # [B, max_q]
    mask = key_valid[:, None, :].expand(num_seqs, max_q, max_len)  # [B, max_q, L]
    if q_row_valid is not None:
        mask = mask & q_row_valid[:, :, None]
    if causal:
        mask = mask & (k_pos <= q_pos[:, :, None])
    if sliding_window is not None:
        mask = mask & (q_pos[:, :, None] - k_pos < sliding_window)
    sees_any = mask.any(-1)  # [B, max_q]

    q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    if softcap is None:
        attn_mask = None if bool(mask.all()) else mask[:, None]
        if num_q_heads == num_kv_heads or _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True} if num_q_heads != num_kv_heads else {}
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=attn_mask, scale=scale, **gqa
            )
        else:
            group = num_q_heads // num_kv_heads
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=scale)
    else:
        o = _softcap_attention(q, keys, values, mask, scale=scale, softcap=softcap)
    o = o.transpose(1, 2)  # [B, max_q, Hq, D]
    o = torch.where(sees_any[:, :, None, None], o, 0).to(out.dtype)
    if q_row_valid is None:
        out.copy_(o.reshape(num_tokens, num_q_heads, head_dim))
    else:
        out.copy_(o[q_row_valid])
    return out


def _softcap_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """fp32 attention with Gemma-2 logit softcapping. q ``[B, Hq, M, D]``, k/v ``[B, Hkv, L, D]``,
    mask ``[B, M, L]``; returns ``[B, Hq, M, D]`` (rows with no visible key are NaN/garbage)."""
    batch, num_q_heads, rows, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    qg = q.float().reshape(batch, num_kv_heads, group, rows, head_dim)
    scores = qg @ k.float()[:, :, None].transpose(-1, -2) * scale  # [B, Hkv, G, M, L]
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = probs @ v.float()[:, :, None]  # [B, Hkv, G, M, D]
    return o.reshape(batch, num_q_heads, rows, head_dim)
