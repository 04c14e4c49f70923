"""Host overhead of pagedkv on this CPU: what the launchers and the HF integration cost in Python
before a kernel starts. On a GPU this cost is paid every layer of every decode step, whether the
kernels are fast or not, so it must stay small.

1. Each public launcher per call, on the CUDA host path, with the kernel launch itself replaced
   by a no-op: the process runs under TRITON_INTERPRET=1 (so the Triton backend takes CPU
   tensors), each kernel object of the kernel modules (`_write_kv_kernel`,
   `_paged_attention_kernel`, `_merge_splits_kernel`, ... and any autotune wrapper) is replaced
   by a stub whose ``[grid](*args, **kwargs)`` does nothing, and `_checks.checks_values` answers
   False, as it does for CUDA tensors (no host reads of index values). Shapes: a decode batch of
   64 sequences, 32 query / 8 KV heads, head_dim 128, bf16, a pool of 4096 blocks of 16 over 32
   layers (allocated with torch.empty: never touched). Goal: <= 15 us per launcher call.
2. One decode step of the HF path (`enable_paged_attention` on a random Llama, 4 layers, hidden
   256) with the kernels stubbed the same way: the whole step, the time spent in pagedkv's hooks
   per layer (the cache's `update`, the attention function) and per step (begin / end of the
   forward), and counts that show the step's metadata (block tables, seq lens, slot mapping) is
   built once per step: manager steps planned per forward, and distinct index tensors handed to
   the kernels over all layers.

Stock transformers (DynamicCache + SDPA, real attention at this tiny size) is timed beside it.
Figures are medians with p20 / p80 over repeats; each repeat times `--inner` calls.

    python examples/benchmark_host.py                  # about a minute
    python examples/benchmark_host.py --repeats 5 --inner 20 --layers 2   # a quick look

CPU only by design (it measures Python, not kernels); TRITON_INTERPRET is set here, before
pagedkv.kernels is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

LAUNCHER_GOAL_US = 15.0  # issue 13: per public launcher call
# Per layer, pagedkv's hooks run write_kv and paged_attention (2 launcher goals) plus their own
# glue (reshapes, dtype casts, finding the step): 10 us for that glue.
LAYER_GOAL_US = 2 * LAUNCHER_GOAL_US + 10.0
KERNEL_MODULES = ("write_kv", "attention", "copy_blocks", "gather_kv")
_KERNEL_NAME = re.compile(r"^_\w+_kernel(_tuned)?$")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also when imported


# ---- timing ---------------------------------------------------------------------------------
@dataclass
class Figure:
    name: str
    samples_us: list[float]  # per call, one per repeat
    goal: str
    ok: bool | None  # None: no pass/fail goal

    @property
    def median(self) -> float:
        return statistics.median(self.samples_us)

    def quantiles(self) -> tuple[float, float]:
        """(p20, p80) of the repeats."""
        if len(self.samples_us) < 2:
            return self.samples_us[0], self.samples_us[0]
        cuts = statistics.quantiles(self.samples_us, n=5, method="inclusive")
        return cuts[0], cuts[3]


def per_call_us(fn: Callable[[], object], repeats: int, inner: int) -> list[float]:
    """Microseconds per call of `fn`, one figure per repeat of `inner` calls (after a warm-up)."""
    from _common import wall_times  # torch only: kernels are not imported before the stubs

    fn()  # a second warm-up call: the first may build what later calls reuse
    return [seconds * 1e6 for seconds in wall_times(fn, repeats, inner)]


def launcher_figure(name: str, samples: list[float]) -> Figure:
    median = statistics.median(samples)
    return Figure(name, samples, f"<= {LAUNCHER_GOAL_US:.0f} us", median <= LAUNCHER_GOAL_US)


def print_table(title: str, figures: list[Figure], unit: str = "us") -> None:
    print(f"\n{title}")
    width = max(len(f.name) for f in figures) + 2
    print(f"{'':{width}}{'median':>10}{'p20':>10}{'p80':>10}   goal")
    for f in figures:
        p20, p80 = f.quantiles()
        verdict = "" if f.ok is None else ("  ok" if f.ok else "  MISSED")
        print(
            f"{f.name:{width}}{f.median:>8.1f}{unit:>2}{p20:>8.1f}{unit:>2}{p80:>8.1f}{unit:>2}"
            f"   {f.goal}{verdict}"
        )


# ---- stubbed kernels ------------------------------------------------------------------------
class _NoLaunch:
    """Stands in for a @triton.jit (or autotuned) kernel: ``[grid](*args, **kwargs)`` launches
    nothing. Counts launches, and keeps the index tensors (int32/int64) each launch received,
    so a caller can tell how many distinct ones a decode step handed over."""

    best_config = None  # what launchers read off an autotuner after a launch

    def __init__(self, name: str, record: _Record) -> None:
        self.name, self.record = name, record

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        self.record.launches[self.name] = self.record.launches.get(self.name, 0) + 1
        if self.record.keep_index_tensors:
            for a in args:
                if getattr(a, "dtype", None) in self.record.index_dtypes:
                    self.record.index_tensors.append(a)


@dataclass
class _Record:
    index_dtypes: tuple
    launches: dict[str, int] = field(default_factory=dict)
    keep_index_tensors: bool = False
    index_tensors: list = field(default_factory=list)

    def distinct_index_tensors(self) -> int:
        return len({id(t) for t in self.index_tensors})  # the list keeps them alive: ids unique


@contextlib.contextmanager
def stubbed_kernels() -> Iterator[_Record]:
    """Every kernel object of pagedkv's kernel modules replaced by `_NoLaunch`, and value checks
    off (`_checks.checks_values` -> False, as for CUDA tensors); both restored on exit. Works
    whatever kernels a module defines (e.g. with or without an autotune wrapper)."""
    import torch

    checks = importlib.import_module("pagedkv.kernels._checks")
    record = _Record(index_dtypes=(torch.int32, torch.int64))
    saved = []
    for short in KERNEL_MODULES:
        module = importlib.import_module(f"pagedkv.kernels.{short}")
        for name, value in list(vars(module).items()):
            if _KERNEL_NAME.match(name) and value is not None:
                saved.append((module, name, value))
                setattr(module, name, _NoLaunch(name, record))
    saved.append((checks, "checks_values", checks.checks_values))
    checks.checks_values = lambda device, backend: False
    try:
        yield record
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


# ---- 1. launchers ---------------------------------------------------------------------------
def launcher_problems(layers: int) -> dict[str, Callable[[], object]]:
    """The public launchers on realistic decode / prefill shapes, as zero-argument calls."""
    import torch

    from pagedkv.kernels import copy_blocks, gather_kv, paged_attention, write_kv

    num_blocks, block_size, hq, hkv, d = 4096, 16, 32, 8, 128
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    # the block-major pool of kvcache: [blocks, layers, K|V, block_size, heads, dim], untouched
    pool = torch.empty(num_blocks, layers, 2, block_size, hkv, d, dtype=dtype)
    keys, values = [pool[:, i, 0] for i in range(layers)], [pool[:, i, 1] for i in range(layers)]
    kc, vc = keys[0], values[0]

    batch, width = 64, 64  # decode: 64 sequences of up to 1k keys fill the pool
    seq_lens = torch.randint(512, width * block_size, (batch,), generator=gen, dtype=torch.int32)
    tables = torch.randperm(num_blocks, generator=gen).view(batch, width)
    tables = tables.to(torch.int32).contiguous()
    last = (seq_lens.long() - 1) // block_size
    slots = tables.long().gather(1, last[:, None])[:, 0] * block_size + (seq_lens - 1) % block_size
    new_k = torch.empty(batch, hkv, d, dtype=dtype)
    new_v = torch.empty(batch, hkv, d, dtype=dtype)
    query = torch.empty(batch, hq, d, dtype=dtype)

    # prefill: 8 sequences of 256 new tokens each over cached prefixes
    q_lens = torch.full((8,), 256, dtype=torch.int32)
    pre_lens = seq_lens[:8].clamp(min=256)
    qsl = torch.zeros(9, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    pre_query = torch.empty(int(qsl[-1]), hq, d, dtype=dtype)
    pre_tables = tables[:8].contiguous()

    mapping = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=torch.int64)
    gathered, small = int(seq_lens.sum()), int(pre_lens.sum())  # num_tokens: no host sync
    out_mib = 2 * gathered * hkv * d * 2 >> 20  # the CPU allocator maps it afresh each call
    scale = d**-0.5
    return {
        f"write_kv (decode, {batch} tokens)": lambda: write_kv(new_k, new_v, kc, vc, slots),
        f"paged_attention decode (B={batch})": lambda: paged_attention(
            query, kc, vc, tables, seq_lens, scale=scale
        ),
        "paged_attention prefill (8 x 256)": lambda: paged_attention(
            pre_query, kc, vc, pre_tables, pre_lens, scale=scale, query_start_loc=qsl
        ),
        f"copy_blocks (4 pairs x {layers} layers)": lambda: copy_blocks(keys, values, mapping),
        f"copy_blocks (4 pairs, {layers} layers stacked)": lambda: copy_blocks(
            pool[:, :, 0], pool[:, :, 1], mapping
        ),
        f"gather_kv (B={batch}, {gathered // 1000}k tokens: {out_mib} MiB out)": lambda: gather_kv(
            kc, vc, tables, seq_lens, num_tokens=gathered
        ),
        f"gather_kv (B=8, {small // 1000}k tokens)": lambda: gather_kv(
            kc, vc, pre_tables, pre_lens, num_tokens=small
        ),
    }


def bench_launchers(args) -> list[Figure]:
    figures = []
    with stubbed_kernels() as record:
        for name, fn in launcher_problems(args.layers).items():
            before = sum(record.launches.values())
            figures.append(launcher_figure(name, per_call_us(fn, args.repeats, args.inner)))
            if sum(record.launches.values()) == before:
                raise RuntimeError(f"{name}: launched no (stubbed) kernel: not the Triton path")
    return figures


# ---- 2. one decode step of the HF path ------------------------------------------------------
class _Timed:
    """Total seconds spent in a function and its number of calls; `wrapper` is the function
    to install in its place (a plain function, so it binds as a method on a class)."""

    def __init__(self, fn: Callable) -> None:
        self.seconds, self.calls = 0.0, 0

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        self.wrapper = wrapper

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


@contextlib.contextmanager
def _patched(target: object, name: str, wrapper: Callable) -> Iterator[None]:
    """`target.name` replaced by `wrapper` for the block (benchmark instrumentation only)."""
    original = getattr(target, name)
    setattr(target, name, wrapper)
    try:
        yield
    finally:
        setattr(target, name, original)


def _time_model_steps(model, make_cache, batch: int, prompt: int, steps: int, inner: int):
    """Per-decode-step seconds of `model` on a cache from `make_cache()`: a prompt of `prompt`
    tokens per row, then `inner` timed decode steps per sample, `steps` samples."""
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=gen)
    samples = []
    for _ in range(steps):
        cache = make_cache()
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            token = ids[:, -1:]
            model(input_ids=token, past_key_values=cache, use_cache=True)  # warm-up step
            t0 = time.perf_counter()
            for _ in range(inner):
                model(input_ids=token, past_key_values=cache, use_cache=True)
            samples.append((time.perf_counter() - t0) / inner)
    return samples


def bench_hf_step(args) -> tuple[list[Figure], list[tuple[str, int, int]]]:
    import warnings

    import torch
    from transformers import DynamicCache

    # transformers >= 5.24 renamed past_key_values to cache; the old name works through 5.x
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)

    from _common import random_llama

    from pagedkv.integrations import _hf_attention
    from pagedkv.integrations._hf_cache import PagedCache
    from pagedkv.integrations.hf import disable_paged_attention, enable_paged_attention

    layers, batch, prompt = args.hf_layers, args.hf_batch, 64
    model = random_llama(
        vocab=1000, hidden=256, layers=layers, heads=4, kv_heads=2, dtype=torch.float32, seed=0
    ).eval()
    inner = max(1, args.inner // 20)

    stock = _time_model_steps(model, DynamicCache, batch, prompt, args.repeats, inner)

    manager = enable_paged_attention(model, block_size=16, num_blocks=4096)
    hooks = {
        "update": _Timed(PagedCache.update),
        "attention": _Timed(_hf_attention.paged_attention_forward),
        "begin_forward": _Timed(PagedCache.begin_forward),
        "end_forward": _Timed(PagedCache.end_forward),
    }
    from transformers import AttentionInterface

    # the public launchers as the pool calls them (pagedkv.kvcache.paged_cache imports them)
    paged_cache = importlib.import_module("pagedkv.kvcache.paged_cache")
    launchers = {
        name: _Timed(getattr(paged_cache, name))
        for name in ("write_kv", "paged_attention")
        if hasattr(paged_cache, name)
    }
    steps_planned = _Timed(manager.step)
    try:
        with contextlib.ExitStack() as stack:
            record = stack.enter_context(stubbed_kernels())
            paged = _time_model_steps(
                model, lambda: PagedCache(manager), batch, prompt, args.repeats, inner
            )
            # Hook times and counts over separate, instrumented steps (the wrappers cost a
            # little, so the whole-step figures above run without them).
            for name in ("update", "begin_forward", "end_forward"):
                stack.enter_context(_patched(PagedCache, name, hooks[name].wrapper))
            AttentionInterface.register(_hf_attention.ATTN_NAME, hooks["attention"].wrapper)
            stack.callback(
                AttentionInterface.register,
                _hf_attention.ATTN_NAME,
                _hf_attention.paged_attention_forward,
            )
            stack.enter_context(_patched(manager, "step", steps_planned.wrapper))
            for name, timer in launchers.items():
                stack.enter_context(_patched(paged_cache, name, timer.wrapper))
            per_sample = {name: [] for name in (*hooks, *launchers)}
            counts = []
            gen = torch.Generator().manual_seed(2)
            ids = torch.randint(3, 1000, (batch, prompt), generator=gen)
            for _ in range(args.repeats):
                cache = PagedCache(manager)
                with torch.no_grad():
                    model(input_ids=ids, past_key_values=cache, use_cache=True)
                    for timer in (*hooks.values(), *launchers.values(), steps_planned):
                        timer.reset()
                    record.index_tensors.clear()
                    record.keep_index_tensors = True
                    model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
                    record.keep_index_tensors = False
                    counts.append((steps_planned.calls, record.distinct_index_tensors()))
                    for _ in range(inner - 1):
                        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
                calls = inner
                for name, timer in (*hooks.items(), *launchers.items()):
                    per = calls if name in ("begin_forward", "end_forward") else layers * calls
                    per_sample[name].append(timer.seconds / per * 1e6)
                cache.free()
                record.index_tensors.clear()
    finally:
        disable_paged_attention(model)

    per_layer = [u + a for u, a in zip(per_sample["update"], per_sample["attention"], strict=True)]
    figures = [
        Figure(f"stock decode step ({layers} layers, B={batch})", [s * 1e3 for s in stock],
               "(reference: DynamicCache + SDPA)", None),
        Figure(f"pagedkv decode step ({layers} layers, B={batch})", [s * 1e3 for s in paged],
               "(kernels stubbed)", None),
    ]  # fmt: skip
    glue = [h - sum(per_sample[name][i] for name in launchers) for i, h in enumerate(per_layer)]
    per_layer_figures = [
        Figure("per layer: update + attention hooks", per_layer,
               f"<= {LAYER_GOAL_US:.0f} us (2 launchers + 10 us glue)",
               statistics.median(per_layer) <= LAYER_GOAL_US),
        Figure("  of which update (write_kv)", per_sample["update"], "", None),
        Figure("  of which attention (paged_attention)", per_sample["attention"], "", None),
        *(Figure(f"  of which the {name} launcher", per_sample[name], "", None)
          for name in launchers),
        Figure("  of which glue (hooks less launchers)", glue, "<= 10 us",
               statistics.median(glue) <= 10.0),
        Figure("per step: begin_forward (plans the step)", per_sample["begin_forward"], "", None),
        Figure("per step: end_forward (commits)", per_sample["end_forward"], "", None),
        Figure("per step / layer: whole step / layers",
               [s * 1e6 / layers for s in paged], "", None),
    ]  # fmt: skip
    steps_seen = sorted({c[0] for c in counts})
    tensors_seen = sorted({c[1] for c in counts})
    count_rows = [
        ("manager steps planned per decode forward", steps_seen[-1], 1),
        ("distinct index tensors the kernels got over all layers", tensors_seen[-1], 3),
    ]
    return figures + per_layer_figures, count_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per figure")
    parser.add_argument("--inner", type=int, default=400, help="launcher calls per repeat")
    parser.add_argument("--layers", type=int, default=32, help="layers of the launchers' pool")
    parser.add_argument("--hf-layers", type=int, default=4, help="layers of the random Llama")
    parser.add_argument("--hf-batch", type=int, default=8, help="decode rows of the HF step")
    parser.add_argument("--skip-hf", action="store_true", help="launchers only")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.inner < 1 or args.layers < 1 or args.hf_layers < 1:
        parser.error("--repeats, --inner, --layers and --hf-layers must be >= 1")

    if "pagedkv.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("pagedkv.kernels was imported without TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / pagedkv.kernels are imported
    os.environ.pop("PAGEDKV_BACKEND", None)
    import torch

    torch.set_num_threads(1)  # host overhead: one thread, no intra-op wake-ups
    from pagedkv import kernels

    if not kernels.triton_interpreted():
        raise RuntimeError("the kernels were not decorated by the Triton interpreter")

    print(f"pagedkv host overhead on {os.cpu_count()} CPU(s), torch {torch.__version__}, "
          f"{args.repeats} repeats (median, p20, p80)")  # fmt: skip
    launchers = bench_launchers(args)
    print_table(
        "1. launchers per call, kernel launch stubbed, CUDA host path "
        f"(bf16, Hq 32 / Hkv 8, D 128, pool 4096 x 16 x {args.layers} layers)",
        launchers,
    )
    missed = [f.name for f in launchers if not f.ok]
    if not args.skip_hf:
        figures, counts = bench_hf_step(args)
        print_table(
            "2. HF decode step, random Llama hidden 256, kernels stubbed", figures[:2], "ms"
        )
        print_table("   pagedkv's hooks in that step", figures[2:])
        for name, got, goal in counts:
            verdict = "ok" if got <= goal else "MISSED"
            print(f"   {name}: {got}   goal {goal} (once per step)  {verdict}")
            if got > goal:
                missed.append(name)
        missed += [f.name for f in figures if f.ok is False]
    print("\ngoals missed: " + (", ".join(missed) if missed else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
