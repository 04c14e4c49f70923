"""Helpers the example scripts share. Run as scripts, they import this from their own folder."""

from __future__ import annotations

import argparse

import torch


def int_at_least(minimum: int):
    """An argparse `type` for integers >= `minimum`, whose error names the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{value} is invalid; expected an integer >= {minimum}"
            )
        return value

    return parse


def pad_left(prompts: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` `[batch, longest]` with each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def sync(device) -> None:
    """Wait for queued GPU work, so a timer measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def stock_kv_bytes(out) -> int:
    """K/V tensor bytes of the DynamicCache that a stock generate returned."""
    cache = out["cache"] if "cache" in out else out.get("past_key_values")
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
