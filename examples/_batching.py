"""The continuous-batching workload of `benchmark.py`, and the three ways to serve it.

A workload is many chat requests with prompts of different lengths and a token limit each
(greedy, stopping at the model's end-of-sequence token). It is served by:

- `run_static`: stock `model.generate` over static batches of 8 in arrival order (left-padded;
  each batch runs to its longest limit, each row is cut at its own limit and at its stop token);
- `run_transformers_cb`: transformers' own continuous batching
  (`model.init_continuous_batching()`, one `add_request` per request with its limit);
- `run_paged`: `pagedkv.integrations.generate_batch`.

Each returns the generated ids of every request, in order, so the benchmark can compare tokens.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

# Words the notes of a synthetic chat prompt are drawn from (the real model's prompts are chat
# messages asking to summarise notes; their length sets the prompt's).
_WORDS = [
    "memory",
    "cache",
    "block",
    "page",
    "token",
    "model",
    "request",
    "batch",
    "server",
    "queue",
    "kernel",
    "tensor",
    "layer",
    "window",
    "prefix",
    "stream",
    "user",
    "answer",
    "question",
    "system",
    "value",
    "key",
    "attention",
    "the",
    "of",
    "and",
    "to",
    "in",
]


@dataclass
class Workload:
    prompts: list[list[int]]
    limits: list[int]  # max_new_tokens of each request
    eos: int | list[int] | None
    pad_id: int
    description: str

    @property
    def num_requests(self) -> int:
        return len(self.prompts)


def chat_workload(
    tokenizer, num_requests: int, shortest: int, longest: int, min_new: int, max_new: int, eos
) -> Workload:
    """Chat prompts (the model's chat template) of about `shortest`..`longest` tokens."""
    from _models import chat_ids

    rng = random.Random(0)
    prompts, limits = [], []
    for _ in range(num_requests):
        target = rng.randint(shortest, longest)
        words = []
        ids = chat_ids(tokenizer, "Summarise these notes in one sentence.")
        while len(ids) < target:
            words.append(rng.choice(_WORDS))
            ids = chat_ids(
                tokenizer, f"Notes: {' '.join(words)}. Summarise these notes in one sentence."
            )
        prompts.append(ids)
        limits.append(rng.randint(min_new, max_new))
    lengths = [len(p) for p in prompts]
    desc = (
        f"{num_requests} chat requests, prompts {min(lengths)}..{max(lengths)} tokens, "
        f"max_new_tokens {min(limits)}..{max(limits)}, greedy, stopping at eos"
    )
    return Workload(prompts, limits, eos, tokenizer.pad_token_id, desc)


def random_workload(
    vocab: int, num_requests: int, shortest: int, longest: int, min_new: int, max_new: int
) -> Workload:
    """Random token prompts (a random model: no tokenizer, no stop token)."""
    rng = random.Random(0)
    prompts = [
        [rng.randrange(3, vocab) for _ in range(rng.randint(shortest, longest))]
        for _ in range(num_requests)
    ]
    limits = [rng.randint(min_new, max_new) for _ in range(num_requests)]
    desc = (
        f"{num_requests} random prompts of {shortest}..{longest} tokens, max_new_tokens "
        f"{min_new}..{max_new}, greedy, no stop token"
    )
    return Workload(prompts, limits, None, 0, desc)


def _cut(row: list[int], limit: int, eos) -> list[int]:
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    out = []
    for t in row[:limit]:
        out.append(t)
        if t in stops:
            break
    return out


def run_static(model, work: Workload, batch_size: int = 8) -> list[list[int]]:
    """Stock generate over static batches of `batch_size`, in arrival order."""
    out = []
    device = model.device
    for start in range(0, work.num_requests, batch_size):
        prompts = work.prompts[start : start + batch_size]
        limits = work.limits[start : start + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[work.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            rows = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(limits),
                do_sample=False,
                eos_token_id=work.eos,
                pad_token_id=work.pad_id,
            )
        out += [_cut(row[width:].tolist(), n, work.eos) for row, n in zip(rows, limits)]
    return out


def run_transformers_cb(model, work: Workload, cb_config=None) -> list[list[int]]:
    """transformers' continuous batching, each request with its own limit (`cb_config`: a
    `ContinuousBatchingConfig`; None: its defaults)."""
    from transformers import GenerationConfig

    saved = model.config._attn_implementation
    config = GenerationConfig(
        max_new_tokens=max(work.limits),
        do_sample=False,
        eos_token_id=work.eos,
        pad_token_id=work.pad_id,
    )
    manager = model.init_continuous_batching(
        generation_config=config, continuous_batching_config=cb_config
    )
    manager.start()
    try:
        for i, (p, n) in enumerate(zip(work.prompts, work.limits)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        results = {}
        while len(results) < work.num_requests:
            r = manager.get_result(timeout=600)
            if r is None:
                raise RuntimeError("transformers' continuous batching returned no result in 600 s")
            results[r.request_id] = list(r.generated_tokens)
    finally:
        manager.stop(block=True)
        model.set_attn_implementation(saved)  # it switched the model to its paged attention
    return [_cut(results[f"r{i}"], n, work.eos) for i, n in enumerate(work.limits)]


def run_paged(model, work: Workload, max_num_batched_tokens: int) -> list[list[int]]:
    from pagedkv.integrations import generate_batch

    return generate_batch(
        model,
        work.prompts,
        max_new_tokens=work.limits,
        do_sample=False,
        eos_token_id=work.eos,
        max_num_batched_tokens=max_num_batched_tokens,
    )


def timed(fn, clock=time.perf_counter) -> tuple[list[list[int]], float]:
    t0 = clock()
    out = fn()
    return out, clock() - t0
