"""Helpers the example scripts share. Run as scripts, they import this from their own folder."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

# The dtypes the examples take by name (--dtype), and their torch dtypes.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def block_size_arg(text: str) -> int:
    """An argparse `type` for a KV block size: a power of two <= 128 (what the kernels take)."""
    value = int_at_least(1)(text)
    if value & (value - 1) or value > 128:
        raise argparse.ArgumentTypeError(f"{value} is invalid; expected a power of two <= 128")
    return value


def device_arg(text: str) -> str:
    """An argparse `type` for a torch device pagedkv runs on (cpu, cuda, cuda:1)."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (cpu, cuda, cuda:1)"
        ) from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: pagedkv runs on cpu or cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    return text


def random_llama(
    *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, dtype, seed: int
) -> torch.nn.Module:
    """A random Llama built from a config (no download): pad, bos, eos ids 0, 1, 2."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def random_gemma3(
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    window: int,
    dtype,
    seed: int,
    context: int = 4096,
) -> torch.nn.Module:
    """A random Gemma 3 text model built from a config: five sliding-window layers to one of
    full attention (the checkpoints' pattern), pad, bos, eos ids 0, 1, 2."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        sliding_window=window,
        layer_types=[
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)
        ],
        max_position_embeddings=context,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def wall_times(fn: Callable[[], object], repeats: int, inner: int = 1) -> list[float]:
    """Sorted seconds per call of `fn` over `repeats` timed batches of `inner` calls, after one
    untimed warm-up call (wall clock: for CPU work, or where CUDA events are not at hand)."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return sorted(samples)


def median_time(fn: Callable[[], object], repeats: int, inner: int = 1) -> float:
    """Median seconds per call of `fn` (see `wall_times`)."""
    return statistics.median(wall_times(fn, repeats, inner))


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
    return cache_kv_bytes(out["cache"] if "cache" in out else out.get("past_key_values"))


def cache_kv_bytes(cache) -> int:
    """K/V tensor bytes a transformers Cache holds (its layers' keys and values)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
