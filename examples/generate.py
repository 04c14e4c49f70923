"""Generate with pagedkv and check it against stock transformers.

    python examples/generate.py                          # offline: a small random Llama
    python examples/generate.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --dtype bfloat16
    python examples/generate.py --batch-size 8 --max-new-tokens 64 --num-beams 4

Without `--model` the script builds a small random Llama from a config (no download), so it
runs anywhere; its "text" is token ids. With `--model NAME_OR_PATH` it loads that model and its
tokenizer.

One run:
  1. stock `generate` (DynamicCache + sdpa) on a batch of left-padded prompts of mixed lengths;
  2. the same call with paged attention enabled (`enable_paged_attention`);
  3. a second turn: each row's prompt + answer + a follow-up, which reuses the blocks the first
     call left in the prefix cache (paged), against stock on the same inputs.
It prints the answers, tokens/s of stock and paged side by side, KV memory of both (paged: the
manager's blocks in use x bytes per block at the peak of the call; stock: the DynamicCache's
K/V tensor bytes at the end), the prefix-cache hits of the second turn, and the manager's stats.
It checks that paged tokens equal stock tokens; in float32 a mismatch makes the exit status 1
(half precision may flip near-ties, so there it is reported as a warning).

Kernels: Triton on CUDA; on CPU the torch reference (set PAGEDKV_BACKEND to force one).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

import torch
from _common import (
    DTYPES,
    block_size_arg,
    device_arg,
    int_at_least,
    pad_left,
    random_llama,
    stock_kv_bytes,
    sync,
)

# The offline model: a small random Llama (GQA, 2 layers), big enough to exercise the paths.
RANDOM_LLAMA = {"vocab": 1024, "hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2}

TEXT_PROMPTS = [
    "The capital of France is",
    "Paged attention stores the key-value cache in fixed-size blocks so that",
    "Write a haiku about memory:",
    "In one sentence, explain why the sky is blue.",
    "def fibonacci(n):",
    "Once upon a time, in a village at the edge of a forest, there lived",
    "The three laws of thermodynamics are",
    "Translate to German: The weather is nice today.",
]
FOLLOW_UP = "\nTell me more."


# ---- argument parsing ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="model id or path (default: a small random Llama, offline)")
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="prompts (default 4)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32, help="default 32")
    p.add_argument("--num-beams", type=int_at_least(1), default=1, help="beam search if > 1")
    p.add_argument("--block-size", type=block_size_arg, default=16, help="tokens per KV block")
    p.add_argument(
        "--num-blocks", type=int_at_least(1), default=None, help="KV pool size (default: fits)"
    )
    p.add_argument(
        "--device", type=device_arg, default=None, help="cpu, cuda (default: cuda if available)"
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="model and cache dtype (auto: float32 on cpu, bfloat16 on cuda)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on a terminal)",
    )
    return p


# ---- model and prompts --------------------------------------------------------------------------
def load_model(args) -> tuple[torch.nn.Module, object | None, str]:
    """(model, tokenizer or None, description)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[args.dtype]
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation="sdpa"
        )
        desc = f"{args.model}"
    else:
        model = random_llama(**RANDOM_LLAMA, dtype=dtype, seed=args.seed)
        tokenizer = None
        c = RANDOM_LLAMA
        desc = (
            f"random Llama built from a config (no --model given; offline): hidden "
            f"{c['hidden']}, {c['layers']} layers, {c['heads']} heads / {c['kv_heads']} KV "
            f"heads, vocab {c['vocab']}; its output is token ids"
        )
    model.to(args.device).eval()
    if tokenizer is None:
        # Random weights emit EOS at random; run every row to max_new_tokens so rows compare.
        model.generation_config.eos_token_id = None
    return model, tokenizer, desc


def random_prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    """`batch` random prompts of mixed lengths (16..112 tokens), avoiding pad/bos/eos ids."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [16 + (37 * i) % 97 for i in range(batch)]
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def make_prompts(args, model, tokenizer) -> tuple[list[list[int]], list[int]]:
    """(token ids of each prompt, token ids of the follow-up of the second turn)."""
    if tokenizer is None:
        prompts = random_prompts(args.batch_size, model.config.vocab_size, args.seed + 1)
        follow = torch.randint(
            3, model.config.vocab_size, (8,), generator=torch.Generator().manual_seed(args.seed)
        ).tolist()
        return prompts, follow
    texts = [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] for i in range(args.batch_size)]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    return prompts, tokenizer(FOLLOW_UP, add_special_tokens=False)["input_ids"]


# ---- measuring ----------------------------------------------------------------------------------
@contextlib.contextmanager
def progress_bar(model, total: int, desc: str, enabled: bool | None) -> Iterator[None]:
    """A tqdm bar advanced by every forward of `model` (prefill + one per new token)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the `bench` extra; run without a bar
        yield
        return
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=enabled is False or None)
    if enabled is None:
        bar.disable = not sys.stderr.isatty()

    def step(*args) -> None:  # a forward hook must return None, or it replaces the output
        bar.update(1)

    handle = model.register_forward_hook(step)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def timed_generate(model, inputs, gen_kwargs, *, progress=None, desc="") -> tuple[object, float]:
    device = inputs["input_ids"].device
    steps = gen_kwargs["max_new_tokens"]
    with progress_bar(model, steps, desc, progress), torch.no_grad():
        torch.manual_seed(0)
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(**inputs, **gen_kwargs)
        sync(device)
    return out, time.perf_counter() - t0


def second_turn(out, inputs, tokenizer, follow: list[int]) -> list[list[int]]:
    """Each row's prompt + answer (up to its EOS) + the follow-up: the next turn of a chat."""
    width = inputs["input_ids"].shape[1]
    mask = inputs["attention_mask"].bool().cpu()
    eos = None if tokenizer is None else tokenizer.eos_token_id
    rows = []
    for i, row in enumerate(out.sequences[: mask.shape[0]].cpu()):
        answer = row[width:].tolist()
        if eos is not None and eos in answer:
            answer = answer[: answer.index(eos) + 1]
        rows.append(row[:width][mask[i]].tolist() + answer + follow)
    return rows


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    row, col = (a != b).nonzero()[0].tolist()
    return f"row {row}, column {col}: stock {int(a[row, col])} vs paged {int(b[row, col])}"


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"

    from pagedkv.integrations import disable_paged_attention, enable_paged_attention
    from pagedkv.kernels import resolve_backend

    model, tokenizer, desc = load_model(args)
    prompts, follow = make_prompts(args, model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else model.config.pad_token_id
    inputs = pad_left(prompts, pad_id, args.device)
    width = inputs["input_ids"].shape[1]
    gen_kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        do_sample=False,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
    )
    backend = resolve_backend(None, torch.device(args.device))
    print(f"model:   {desc}")
    print(
        f"batch:   {len(prompts)} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} "
        f"tokens (left-padded to {width}), {args.max_new_tokens} new tokens, "
        f"{args.num_beams} beam(s), {args.dtype} on {args.device}; paged kernels: {backend}"
    )

    # Stock first; each path is warmed up on a short call so first-call costs do not count.
    short = {**gen_kwargs, "max_new_tokens": 2}
    timed_generate(model, inputs, short)
    stock, t_stock = timed_generate(model, inputs, gen_kwargs, progress=args.progress, desc="stock")
    stock_bytes = stock_kv_bytes(stock)
    inputs2 = pad_left(second_turn(stock, inputs, tokenizer, follow), pad_id, args.device)
    stock2, t_stock2 = timed_generate(
        model, inputs2, gen_kwargs, progress=args.progress, desc="stock, turn 2"
    )

    overrides = {"block_size": args.block_size}
    if args.num_blocks:
        overrides["num_blocks"] = args.num_blocks
    else:  # room for both turns: prompt + answer + follow-up per beam, plus slack
        need = args.num_beams * sum(
            -(-(len(p) + 2 * args.max_new_tokens + len(follow)) // args.block_size) + 2
            for p in prompts
        )
        overrides["num_blocks"] = 2 * need + 16
    manager = enable_paged_attention(model, **overrides)
    try:
        timed_generate(model, inputs, short)
        manager.reset_prefix_cache()  # the timed call starts from an empty prefix cache
        manager.reset_peak_usage()
        paged, t_paged = timed_generate(
            model, inputs, gen_kwargs, progress=args.progress, desc="paged"
        )
        paged_peak = manager.peak_used_bytes
        # Turn 2 (prompt + answer + follow-up) finds turn 1's blocks in the prefix cache.
        before = manager.stats
        manager.reset_peak_usage()
        paged2, t_paged2 = timed_generate(
            model, inputs2, gen_kwargs, progress=args.progress, desc="paged, turn 2"
        )
        after = manager.stats
        paged2_peak = manager.peak_used_bytes
    finally:
        disable_paged_attention(model)

    # ---- report ----
    new_tokens = (stock.sequences.shape[1] - width) * len(prompts)
    print()
    for i in range(len(prompts)):
        answer = paged.sequences[i, width:].tolist()
        if tokenizer is None:
            shown = " ".join(map(str, answer[:24])) + (" ..." if len(answer) > 24 else "")
            print(f"[{i}] prompt {len(prompts[i])} tokens -> ids: {shown}")
        else:
            text = tokenizer.decode(answer, skip_special_tokens=True).replace("\n", " ")
            print(f"[{i}] {tokenizer.decode(prompts[i], skip_special_tokens=True)!r} -> {text!r}")

    queries = after.prefix_queries - before.prefix_queries
    hits = after.prefix_hits - before.prefix_hits
    print()
    print(f"{'':22}{'stock':>14}{'paged':>14}{'paged/stock':>14}")
    print(
        f"{'turn 1 tokens/s':22}{new_tokens / t_stock:14.1f}{new_tokens / t_paged:14.1f}"
        f"{t_stock / t_paged:13.2f}x"
    )
    print(
        f"{'turn 1 KV memory':22}{_mib(stock_bytes):>14}{_mib(paged_peak):>14}"
        f"{paged_peak / stock_bytes if stock_bytes else float('nan'):13.2f}x"
    )
    print(f"{'turn 2 time (s)':22}{t_stock2:14.3f}{t_paged2:14.3f}{t_paged2 / t_stock2:13.2f}x")
    stock2_bytes = stock_kv_bytes(stock2)
    print(
        f"{'turn 2 KV memory':22}{_mib(stock2_bytes):>14}{_mib(paged2_peak):>14}"
        f"{paged2_peak / stock2_bytes if stock2_bytes else float('nan'):13.2f}x"
    )
    bpb = manager.config.bytes_per_block
    print(
        "(tokens/s ratio: paged speed / stock speed; time and memory ratios: paged / stock. "
        f"Paged memory: peak blocks in use ({paged_peak // bpb} in turn 1, {paged2_peak // bpb} "
        f"in turn 2, of {manager.config.num_blocks}) x {bpb} bytes per block; stock: DynamicCache "
        "K/V tensor bytes at the end.)"
    )
    print(
        f"turn 2 prefix cache: {hits} of {queries} prompt tokens were cached "
        f"({hits / queries if queries else 0:.0%}); transformers computed only the rest"
    )
    print(f"manager: {manager!r}")
    print(f"stats:   {manager.stats.as_dict()}")

    ok = True
    for name, a, b in (("turn 1", stock, paged), ("turn 2", stock2, paged2)):
        if torch.equal(a.sequences, b.sequences):
            print(f"check:   {name}: paged tokens == stock tokens")
        else:
            ok = False
            print(
                f"check:   {name}: paged tokens != stock tokens ({first_difference(a.sequences, b.sequences)})"
            )
    if not ok:
        if args.dtype == "float32":
            print("FAILED: paged generation differs from stock in float32", file=sys.stderr)
            return 1
        print(
            f"warning: tokens differ in {args.dtype}; half precision can flip near-tied logits",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
