"""End-to-end section of `benchmark_kernels.py`: `model.generate` stock (DynamicCache + SDPA)
vs pagedkv (`paged_attention(model, ...)`) on a random Llama of a 1B model's shape (hidden
2048, 16 layers, 32 query / 8 KV heads, head_dim 64, intermediate 8192, vocab 32000; bf16;
built from a config on the device, nothing downloaded), stock and paged interleaved:

- decode: a batch of 64 left-padded prompts of 128..1024 tokens, 128 new tokens, greedy;
- beams: 4-beam search on a 1024-token prompt, 128 new tokens;
- prefix: a second call whose prompt shares a 2048-token prefix with the first call's (paged
  runs the first call untimed before each timed one, so it finds the prefix cached), 1 new
  token: the time to the first token, which is what prefix reuse saves.

Every row runs to max_new_tokens (no end-of-sequence token). Tokens/s = new tokens of the
returned sequences / seconds (wall clock around generate, the device synchronised). KV memory:
paged = the manager's peak bytes in use during the call (`manager.peak_used_bytes`); stock =
the K/V tensor bytes of the DynamicCache generate returns (it only grows, so that is its peak).
On CUDA each side also gets `torch.cuda.max_memory_allocated` minus what was allocated before
the call: everything the call allocated at its peak (cache, activations, logits), which for
paged excludes its pool (allocated when enabled). Greedy tokens are compared; where a row
differs, stock's logits at the first difference show whether it is a near-tie (bf16).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from _common import pad_left, stock_kv_bytes, sync
from _gpu_budget import Budget, last_line, split_budget

PAD = 0
BLOCK_SIZE = 16
MAX_ROUNDS = 3  # timed rounds at most (at least 1; more while the budget allows)
SMOKE_ROUNDS = 2
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8)  # fmt: skip
LLAMA_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
CASE_WEIGHTS = {"decode": 0.45, "beams": 0.35, "prefix": 0.2}  # of the section's time


def build_llama(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A random Llama from a config, its weights created on `device`; every row of generate
    runs to max_new_tokens (no end-of-sequence token)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, max_position_embeddings=8192, pad_token_id=PAD,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.to(device).eval()  # (a transformers version that ignored the device context)
    model.generation_config.eos_token_id = None
    return model


class LazyModel:
    """The section's model, built on first use and shared by the sections after it."""

    def __init__(self, device: torch.device, dtype: torch.dtype, *, smoke: bool) -> None:
        self.device, self.dtype, self.smoke = device, dtype, smoke
        self._model = None
        self.build_s: float | None = None

    def get(self):
        if self._model is None:
            t0 = time.perf_counter()
            self._model = build_llama(LLAMA_TINY if self.smoke else LLAMA_1B, self.dtype,
                                      self.device)  # fmt: skip
            sync(self.device)
            self.build_s = time.perf_counter() - t0
        return self._model

    def describe(self) -> str:
        c = self.get().config
        params = sum(p.numel() for p in self.get().parameters())
        return (
            f"random Llama (hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
            f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads, head_dim "
            f"{c.hidden_size // c.num_attention_heads}, intermediate {c.intermediate_size}, "
            f"vocab {c.vocab_size}, {params / 1e6:,.1f}M params, "
            f"{str(self.dtype).removeprefix('torch.')})"
        )


@dataclass(frozen=True)
class Case:
    name: str
    setup: str
    prompts: list[list[int]]
    kwargs: dict  # max_new_tokens, num_beams
    num_blocks: int  # paged pool
    first: list[list[int]] | None = None  # prefix: the first call, run untimed by paged


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def _blocks(lengths: list[int], copies: int = 1) -> int:
    return copies * sum(-(-n // BLOCK_SIZE) + 1 for n in lengths) + 64


def make_cases(vocab: int, *, smoke: bool) -> list[Case]:
    batch, shortest, longest, new = (4, 4, 24, 4) if smoke else (64, 128, 1024, 128)
    lengths = [round(shortest + (longest - shortest) * i / (batch - 1)) for i in range(batch)]
    decode = Case(
        "decode", f"batch {batch}, prompts {shortest}..{longest} tokens, {new} new, greedy",
        [random_tokens(n, vocab, seed=i) for i, n in enumerate(lengths)],
        {"max_new_tokens": new, "num_beams": 1}, _blocks([n + new for n in lengths]),
    )  # fmt: skip
    beams = Case(
        "beams", f"4 beams, 1 prompt of {longest} tokens, {new} new",
        [random_tokens(longest, vocab, seed=100)], {"max_new_tokens": new, "num_beams": 4},
        _blocks([longest + new], copies=4),
    )  # fmt: skip
    prefix_len, rest = (48, 8) if smoke else (2048, 32)
    prefix = random_tokens(prefix_len, vocab, seed=200)
    second = prefix + random_tokens(rest, vocab, seed=202)
    prefix_case = Case(
        "prefix", f"second call: {prefix_len}-token shared prefix + {rest} new prompt tokens, "
        "1 new token", [second], {"max_new_tokens": 1, "num_beams": 1},
        _blocks([prefix_len + rest + 1] * 2), first=[prefix + random_tokens(rest, vocab, 201)],
    )  # fmt: skip
    return [decode, beams, prefix_case]


def timed_generate(model, inputs: dict, kwargs: dict) -> tuple[object, float, int | None]:
    """(output, seconds, bytes allocated at the peak beyond those held before; None off CUDA)."""
    device = model.device
    on_gpu = device.type == "cuda"
    sync(device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs, do_sample=False, pad_token_id=PAD,
                             return_dict_in_generate=True)  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - before if on_gpu else None
    return out, seconds, peak


def _paged_call(model, case: Case, kwargs: dict) -> tuple[object, float, int | None, dict]:
    """One paged call on a fresh manager (nothing cached from an earlier round); with
    `case.first`, that call runs first, untimed."""
    from pagedkv.integrations.hf import paged_attention

    with paged_attention(model, block_size=BLOCK_SIZE, num_blocks=case.num_blocks) as manager:
        if case.first is not None:
            timed_generate(model, pad_left(case.first, PAD, model.device), kwargs)
        manager.reset_peak_usage()
        before = manager.stats
        out, seconds, peak = timed_generate(model, pad_left(case.prompts, PAD, model.device),
                                            kwargs)  # fmt: skip
        after = manager.stats
        info = {
            "paged_kv_bytes": manager.peak_used_bytes,
            "paged_pool_bytes": manager.config.total_bytes,
            "prefix_hits": after.prefix_hits - before.prefix_hits,
            "prefix_queries": after.prefix_queries - before.prefix_queries,
            "cow_copies": after.cow_copies - before.cow_copies,
        }
    return out, seconds, peak, info


def compare(model, case: Case, budget: Budget, max_rounds: int = MAX_ROUNDS) -> dict:
    """Stock vs paged rounds of one case, interleaved, after an untimed warm-up round of at
    most 2 new tokens (compiles the kernels, warms allocators)."""
    inputs = pad_left(case.prompts, PAD, model.device)
    warm = {**case.kwargs, "max_new_tokens": min(2, case.kwargs["max_new_tokens"])}
    timed_generate(model, inputs, warm)
    _paged_call(model, case, warm)
    stock_s, paged_s = [], []
    while len(stock_s) < max_rounds:
        t0 = time.perf_counter()
        stock, seconds, stock_peak = timed_generate(model, inputs, case.kwargs)
        stock_s.append(seconds)
        paged, seconds, paged_peak, info = _paged_call(model, case, case.kwargs)
        paged_s.append(seconds)
        if not budget.allows(1.2 * (time.perf_counter() - t0)):
            break
    new_tokens = stock.sequences.shape[0] * case.kwargs["max_new_tokens"]
    result = {
        "setup": case.setup,
        "rounds": len(stock_s),
        "stock_s": statistics.median(stock_s),
        "paged_s": statistics.median(paged_s),
        "stock_samples_s": stock_s,
        "paged_samples_s": paged_s,
        "new_tokens": new_tokens,
        "stock_kv_bytes": stock_kv_bytes(stock),
        "stock_peak_alloc_bytes": stock_peak,
        "paged_peak_alloc_bytes": paged_peak,
        **info,
    }
    result["time_ratio"] = result["paged_s"] / result["stock_s"]
    result["stock_tokens_per_s"] = new_tokens / result["stock_s"]
    result["paged_tokens_per_s"] = new_tokens / result["paged_s"]
    stock_bytes = result["stock_kv_bytes"]
    result["memory_ratio"] = result["paged_kv_bytes"] / stock_bytes if stock_bytes else None
    result["tokens"] = compare_tokens(model, inputs, stock.sequences, paged.sequences,
                                      greedy=case.kwargs["num_beams"] == 1)  # fmt: skip
    return result


def compare_tokens(model, inputs: dict, stock: torch.Tensor, paged: torch.Tensor, *,
                   greedy: bool, explain: int = 3) -> dict:  # fmt: skip
    """Rows whose paged tokens differ from stock's; for the first `explain` of them (greedy),
    stock's top-2 logits at the first difference: a gap near 0 is a near-tie."""
    width = inputs["input_ids"].shape[1]
    if stock.shape != paged.shape:
        return {"rows": stock.shape[0], "rows_differ": stock.shape[0],
                "note": f"shapes differ: stock {list(stock.shape)}, paged {list(paged.shape)}"}  # fmt: skip
    differ = (stock != paged).any(dim=1).nonzero().flatten().tolist()
    firsts = []
    for row in differ[: explain if greedy else 0]:
        at = int((stock[row, width:] != paged[row, width:]).nonzero()[0])
        ids = stock[row : row + 1, : width + at]
        mask = torch.cat([inputs["attention_mask"][row : row + 1],
                          torch.ones_like(ids[:, width:])], dim=1)  # fmt: skip
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
        top = logits.topk(2)
        firsts.append({
            "row": row, "position": at,
            "stock_top2_gap": round(float(top.values[0] - top.values[1]), 5),
            "paged_token_gap": round(float(top.values[0] - logits[paged[row, width + at]]), 5),
        })  # fmt: skip
    return {"rows": stock.shape[0], "rows_differ": len(differ), "first_differences": firsts}


def run_generate(budget: Budget, out: dict, lazy: LazyModel, *, smoke: bool) -> None:
    """Fill `out`: the model, then one result per case (a case that raises is recorded and
    the next runs; one that does not fit in the time left is skipped)."""
    model = lazy.get()
    out.update(model=lazy.describe(), model_build_s=lazy.build_s, block_size=BLOCK_SIZE,
               cases={}, failures=[], skipped=[])  # fmt: skip
    cases = make_cases(model.config.vocab_size, smoke=smoke)
    weights = {c.name: CASE_WEIGHTS[c.name] for c in cases}
    for case in cases:
        share = Budget(split_budget(budget.left(), weights, case.name))
        weights.pop(case.name)
        if share.seconds < 1:
            out["skipped"].append(f"{case.name}: out of time")
            continue
        try:
            rounds = SMOKE_ROUNDS if smoke else MAX_ROUNDS
            r = out["cases"][case.name] = compare(model, case, share, rounds)
            print(f"  {case.name}: paged/stock time {r['time_ratio']:.2f}x, KV "
                  f"{_f(r['memory_ratio'])}x, rows differ {r['tokens']['rows_differ']} of "
                  f"{r['tokens']['rows']}", flush=True)  # fmt: skip
        except Exception as err:
            out["failures"].append(f"{case.name}: raised {last_line(err)}")
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


def _f(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"
