"""Padded batches: which of the columns transformers feeds each row stores, and which of those
are real tokens.

A row's leading pads (left padding) are never stored. From its first real token on, every
column is stored in order; a pad among them (right padding, or a hole in the mask) is stored
invalid: kept in its slot so positions match the columns, hidden from every query.
"""

from __future__ import annotations

import torch

__all__ = ["check_positions", "window_spans"]


def window_spans(
    attention_mask: torch.Tensor | None, fed: list[int], q_len: int, expand: int
) -> tuple[list[int], torch.Tensor | None]:
    """For the forward's `q_len` new columns: how many each row stores (all of them once it has
    stored a token, else those from its first real one), and the window's validity, a CPU bool
    `[rows, q_len]` (None: every column real). `fed[i]`: columns row i stored before;
    `expand` copies of each row are in the forward's batch."""
    rows = len(fed)
    if attention_mask is None or q_len == 1:
        return [q_len] * rows, None  # a decode step's new column is never padding
    if attention_mask.ndim != 2:
        raise ValueError(
            "pagedkv attention takes a 2-D padding mask [batch, length]; got a "
            f"{attention_mask.ndim}-D attention_mask"
        )
    window = attention_mask[::expand, -q_len:].to("cpu", torch.bool)
    if window.shape[1] < q_len or bool(window.all()):
        return [q_len] * rows, None
    first = torch.where(window.any(1), window.int().argmax(1), q_len).tolist()
    spans = [q_len if n else q_len - f for n, f in zip(fed, first, strict=True)]
    return spans, window


def check_positions(
    position_ids: torch.Tensor, fed: list[int], spans: list[int], q_len: int, expand: int
) -> None:
    """Each row's first new token must sit right after the `fed` tokens before it (for rows
    without stored pads, where positions count the stored tokens).

    Catches a caller that feeds again tokens the cache holds (as a pre-filled cache given to a
    generate mode that ignores it would): that would be silently wrong otherwise.
    """
    if position_ids.ndim != 2 or position_ids.shape[-1] < q_len:
        return  # e.g. multimodal 3-D positions: not ours to interpret
    first = position_ids[:, -q_len:].to("cpu")
    if first.shape[0] == 1:
        first = first.expand(len(fed) * expand, -1)
    first = first[::expand]
    for b, (n, r) in enumerate(zip(fed, spans, strict=True)):
        if r and int(first[b, q_len - r]) != n:
            raise RuntimeError(
                f"row {b}: the forward's first new token has position "
                f"{int(first[b, q_len - r])}, but the cache holds {n} tokens of that row "
                "(tokens fed again, or positions that do not follow the cache)"
            )
