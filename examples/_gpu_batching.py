"""Continuous-batching section of `benchmark_kernels.py`: one workload of random-token requests
on the end-to-end section's model, served three ways (`_batching`), interleaved:

- pagedkv's `generate_batch` (token budget TOKEN_BUDGET per forward, at most 64 sequences);
- transformers' continuous batching (`init_continuous_batching`), with the same token budget
  per batch and a KV pool sized to the workload (its default takes 90% of free GPU memory);
  its other settings are its defaults (it switches to flash attention when that is installed:
  `transformers_flash` in the results says whether it could);
- stock `generate` over static batches of 8 in arrival order (each row cut at its limit).

An untimed warm-up of two short requests runs each first. Throughput = tokens generated /
wall time; goals (docs/benchmarks.md): paged >= 2.0x static generate and >= 1.5x transformers'.
Tokens of paged and of transformers' are compared with static generate's (bf16 near-ties
make a few differ; they are counted, not failed).
"""

from __future__ import annotations

import statistics
import time

import _batching
from _common import sync
from _gpu_budget import Budget, last_line

GOALS = {"vs_static": 2.0, "vs_transformers": 1.5}  # throughput ratios, higher is better
MAX_ROUNDS = 2


def workload(vocab: int, *, smoke: bool) -> _batching.Workload:
    if smoke:
        return _batching.random_workload(vocab, 6, 4, 30, 2, 8)
    return _batching.random_workload(vocab, 64, 32, 512, 16, 128)


def token_budget(smoke: bool) -> int:
    return 32 if smoke else 2048


def cb_config(work: _batching.Workload, tokens_per_batch: int):
    """transformers' ContinuousBatchingConfig with a pool that holds the whole workload (its
    blocks hold 256 tokens of every layer: `page_size`, `block_size` before 5.24)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    default = ContinuousBatchingConfig()
    per_block = getattr(default, "page_size", None) or default.block_size
    blocks = sum(-(-(len(p) + n) // per_block) for p, n in zip(work.prompts, work.limits))
    return ContinuousBatchingConfig(num_blocks=blocks + 8, max_batch_tokens=tokens_per_batch)


def flash_available() -> bool | None:
    """Whether transformers' continuous batching can switch to flash attention here."""
    try:
        from transformers.utils.import_utils import (
            is_flash_attn_2_available,
            is_flash_attn_3_available,
        )

        return bool(is_flash_attn_3_available() or is_flash_attn_2_available())
    except Exception:
        return None


def servers(model, smoke: bool) -> dict:
    """The three ways to serve a workload: name -> fn(workload) -> generated ids per request."""
    budget = token_budget(smoke)
    return {
        "static": lambda w: _batching.run_static(model, w),
        "transformers": lambda w: _batching.run_transformers_cb(model, w, cb_config(w, budget)),
        "paged": lambda w: _batching.run_paged(model, w, budget),
    }


def run_batching(budget: Budget, out: dict, lazy, *, smoke: bool) -> None:
    """Fill `out`: setup, seconds per server per round, throughput, ratios, differences. A
    server that raises or generates nothing drops out (`server_errors`); paged doing so is a
    failure, a baseline doing so is not (transformers 5.17's continuous batching, for one,
    sizes its cache from GPU memory and generates nothing on CPU)."""
    model = lazy.get()
    work = workload(model.config.vocab_size, smoke=smoke)
    out.update(model=lazy.describe(), setup=work.description, token_budget=token_budget(smoke),
               transformers_flash=flash_available(), goals=GOALS, failures=[],
               server_errors={})  # fmt: skip
    runs = servers(model, smoke)
    warm = _batching.Workload(work.prompts[:2], [2, 2], work.eos, work.pad_id, "warm-up")
    for name, serve in runs.items():
        _serve(name, serve, warm, model.device, out["server_errors"])
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(1 if smoke else MAX_ROUNDS):
        round_start = time.perf_counter()
        for name, serve in runs.items():
            if name not in out["server_errors"]:
                served = _serve(name, serve, work, model.device, out["server_errors"])
                if served is not None:
                    outputs[name] = served[0]
                    times[name].append(served[1])
        out["samples_s"] = times
        if not budget.allows(1.2 * (time.perf_counter() - round_start)):
            break
    if "paged" in out["server_errors"]:
        out["failures"].append(f"paged generate_batch: {out['server_errors']['paged']}")
    for name in out["server_errors"]:  # a server that failed in a later round
        outputs.pop(name, None)
    out.update(summarise(times, outputs))


def _serve(name: str, serve, work, device, errors: dict) -> tuple[list, float] | None:
    """(generated ids, seconds) of one run, or None with the reason in errors[name]."""
    try:
        sync(device)
        t0 = time.perf_counter()
        ids = serve(work)
        sync(device)
        seconds = time.perf_counter() - t0
        if not any(ids):
            raise RuntimeError("generated no tokens (its log above says why)")
    except Exception as err:
        errors[name] = last_line(err)
        return None
    return ids, seconds


def summarise(times: dict[str, list[float]], outputs: dict[str, list[list[int]]]) -> dict:
    """Throughput of each server that ran, and paged's ratios to the others that did."""
    tokens = {name: sum(len(o) for o in rows) for name, rows in outputs.items()}
    rate = {name: tokens[name] / statistics.median(times[name]) for name in outputs}
    ratios: dict[str, float | None] = {}
    for key, other in (("vs_static", "static"), ("vs_transformers", "transformers")):
        both = "paged" in rate and other in rate
        ratios[key] = rate["paged"] / rate[other] if both else None

    def differ(name: str) -> list[int] | None:
        if name not in outputs or "static" not in outputs:
            return None
        pairs = zip(outputs[name], outputs["static"], strict=True)
        return [i for i, (a, b) in enumerate(pairs) if a != b]

    return {
        "rounds": max(len(t) for t in times.values()),
        "tokens": tokens,
        "tokens_per_s": rate,
        "ratios": ratios,
        "meets": {k: None if r is None else r >= GOALS[k] for k, r in ratios.items()},
        "paged_differ_from_static": differ("paged"),
        "transformers_differ_from_static": differ("transformers"),
        "requests": len(next(iter(outputs.values()), [])),
    }
