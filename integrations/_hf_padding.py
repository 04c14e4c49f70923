"""Padded batches: which of the columns transformers feeds are each row's real tokens.

pagedkv stores real tokens only, so a batch must be left-padded (pads before each row's
tokens) and its forwards must feed the columns after those the cache holds.
"""

from __future__ import annotations

import torch

__all__ = ["check_left_padded", "check_positions", "real_tokens"]


def check_left_padded(mask: torch.Tensor) -> None:
    """`mask`: a boolean `[rows, columns]` padding mask on the CPU."""
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "pagedkv needs left padding (pads before the tokens); the attention_mask has a 0 "
            "after a 1. Use tokenizer.padding_side = 'left'."
        )


def real_tokens(
    attention_mask: torch.Tensor | None, rows: int, q_len: int, expand: int
) -> list[int]:
    """Real (non-pad) tokens in each row's window of `q_len` new columns (`expand` copies of
    each row in the forward's batch)."""
    if attention_mask is None or q_len == 1:
        return [q_len] * rows  # a decode step's new column is never padding
    if attention_mask.ndim != 2:
        raise ValueError(
            "pagedkv attention takes a 2-D padding mask [batch, length]; got a "
            f"{attention_mask.ndim}-D attention_mask"
        )
    window = attention_mask[::expand, -q_len:].to("cpu", torch.bool)
    if window.shape[1] < q_len:
        return [q_len] * rows
    check_left_padded(window)
    return window.sum(1).tolist()


def check_positions(
    position_ids: torch.Tensor, fed: list[int], real: list[int], q_len: int, expand: int
) -> None:
    """Each row's first new real token must sit right after the `fed` real tokens before it.

    Catches a caller that feeds again tokens the cache holds (as a pre-filled cache given to a
    generate mode that ignores it would): that would be silently wrong otherwise.
    """
    if position_ids.ndim != 2 or position_ids.shape[-1] < q_len:
        return  # e.g. multimodal 3-D positions: not ours to interpret
    first = position_ids[:, -q_len:].to("cpu")
    if first.shape[0] == 1:
        first = first.expand(len(fed) * expand, -1)
    first = first[::expand]
    for b, (n, r) in enumerate(zip(fed, real, strict=True)):
        if r and int(first[b, q_len - r]) != n:
            raise RuntimeError(
                f"row {b}: the forward's first new token has position "
                f"{int(first[b, q_len - r])}, but the cache holds {n} tokens of that row "
                "(tokens fed again, or positions that do not follow the cache)"
            )
