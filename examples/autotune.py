"""Autotune pagedkv's Triton kernels for a model's shapes and save the best configs.

    python examples/autotune.py --model meta-llama/Llama-3.1-8B --dtype bfloat16 -o tuned.json
    python examples/autotune.py --config-json config.json --batch-sizes 1 8 64
    python examples/autotune.py --num-heads 32 --num-kv-heads 8 --head-dim 128 --block-size 16 32
    python examples/autotune.py --interpret -o /tmp/tuned.json   # tiny sweep on CPU (CI)

Shapes come from a transformers config (`--model`, `--config-json`) or from flags (heads, KV
heads, head_dim), crossed with block sizes, dtypes, batch sizes and context lengths. For each
op -- `paged_attention` decode and prefill, `write_kv` -- and each tuned-config key
(head_dim, block size, dtype, mode: never token counts), every config of the op's candidate
space for that launch (`candidate_configs` of pagedkv.kernels.attention / .write_kv: the
configs that fit the launch) is first checked against the torch reference,
then timed with `triton.testing.do_bench` (median) on every shape. The table shows config,
time, GB/s (the bytes the op must move at least) and that as a percentage of a
device-to-device copy measured in the same run. The best config per key is the
one with the lowest geometric mean of (time / best time) over the key's shapes; the best configs
are saved with `pagedkv.kernels.save_tuned_configs`, and launchers use them (instead of their
shipped defaults; launchers never autotune by themselves) after

    from pagedkv.kernels import load_tuned_configs
    load_tuned_configs("tuned.json")

Needs CUDA. `--interpret` instead runs a tiny sweep through the Triton interpreter on CPU
(timings there mean nothing; it proves the script and the JSON round trip).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from _common import DTYPES, block_size_arg, int_at_least, wall_times

OPS = ("decode", "prefill", "write_kv")
# --interpret: sizes the Triton interpreter gets through in seconds.
INTERPRET_DEFAULTS = {"batch_sizes": [2], "context_lengths": [40], "prefill_tokens": 8}


# ---- arguments --------------------------------------------------------------------------------
_positive = int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group("shapes (a transformers config, or flags)")
    src.add_argument("--model", help="model id or path: its config gives heads and head_dim")
    src.add_argument("--config-json", help="a transformers config.json file")
    src.add_argument("--num-heads", type=_positive, help="query heads (default 32)")
    src.add_argument("--num-kv-heads", type=_positive, help="KV heads (default: --num-heads)")
    src.add_argument("--head-dim", type=_positive, help="head dim (default 128)")
    src.add_argument("--block-size", type=block_size_arg, nargs="+", default=[16])
    src.add_argument(
        "--dtype", choices=list(DTYPES), nargs="+", default=None, help="default bfloat16"
    )
    src.add_argument("--batch-sizes", type=_positive, nargs="+", default=[1, 8, 32, 128])
    src.add_argument("--context-lengths", type=_positive, nargs="+", default=[512, 2048, 8192])
    src.add_argument(
        "--prefill-tokens",
        type=_positive,
        default=512,
        help="prefill: new query tokens per sequence (the rest of the context is cached)",
    )
    src.add_argument("--ops", choices=OPS, nargs="+", default=list(OPS))
    src.add_argument(
        "--max-cache-gb",
        type=float,
        default=8.0,
        help="skip batch x context shapes whose K/V cache is larger (default 8 GB)",
    )
    run = p.add_argument_group("run")
    run.add_argument("-o", "--output", default="tuned_configs.json", help="JSON to write")
    run.add_argument("--warmup", type=_positive, default=25, help="do_bench warmup (ms)")
    run.add_argument("--rep", type=_positive, default=100, help="do_bench repetitions (ms)")
    run.add_argument(
        "--interpret",
        action="store_true",
        help="tiny sweep through the Triton interpreter on CPU (no CUDA needed)",
    )
    return p


@dataclass(frozen=True)
class Geometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    source: str


def geometry(args, parser) -> Geometry:
    if args.model and args.config_json:
        parser.error("give --model or --config-json, not both")
    cfg = None
    if args.model:
        from transformers import AutoConfig

        cfg, source = AutoConfig.from_pretrained(args.model), args.model
    elif args.config_json:
        from transformers import AutoConfig

        try:
            with open(args.config_json) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            parser.error(f"--config-json {args.config_json!r}: {err}")
        if "model_type" not in data:
            parser.error(f"--config-json {args.config_json!r} has no model_type")
        cfg, source = AutoConfig.for_model(**data), args.config_json
    if cfg is not None:
        from pagedkv.kvcache import KVCacheConfig

        kv = KVCacheConfig.from_model_config(cfg, num_blocks=1)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = getattr(text, "num_attention_heads", None) or kv.num_kv_heads
        return Geometry(int(heads), kv.num_kv_heads, kv.head_dim, source)
    heads = args.num_heads or (2 if args.interpret else 32)
    kv_heads = args.num_kv_heads or (1 if args.interpret else heads)
    head_dim = args.head_dim or (16 if args.interpret else 128)
    if heads % kv_heads:
        parser.error(f"--num-heads {heads} must be a multiple of --num-kv-heads {kv_heads}")
    return Geometry(heads, kv_heads, head_dim, "flags")


# ---- candidate configs --------------------------------------------------------------------------
def candidates(mode: str, g: Geometry, dtype, interpret: bool) -> list:
    """The op's candidate configs for this geometry (see `candidate_configs`), carrying the
    fields it tunes. Under --interpret the first two: the spaces are ordered smallest tile
    first, the cheapest in the interpreter."""
    if mode == "write_kv":
        from pagedkv.kernels.write_kv import candidate_configs

        space = candidate_configs(num_kv_heads=g.num_kv_heads)
    else:
        from pagedkv.kernels.attention import candidate_configs

        group = g.num_heads // g.num_kv_heads
        space = candidate_configs(head_dim=g.head_dim, group=group, dtype=dtype, mode=mode)
    return space[:2] if interpret else space


# ---- one problem ------------------------------------------------------------------------------
@dataclass
class Problem:
    """One shape of one op: `run(config)` launches it, `check(config)` compares with torch."""

    op: str  # "paged_attention" or "write_kv"
    key: str
    shape: str
    bytes_moved: int
    run: Callable
    check: Callable


def make_problem(mode, g: Geometry, dtype, block_size, batch, context, args, device) -> Problem:
    """`batch` sequences of `context` cached tokens in a paged pool of just the blocks they need
    (plus the padding block); decode, prefill of the last `--prefill-tokens` of each, or
    write_kv of that many new tokens per sequence to random slots."""
    import torch

    from pagedkv.kernels import config_key, paged_attention, reference, write_kv
    from pagedkv.kernels.testing import make_paged_problem

    seed = batch * 7919 + context
    q_len = 1 if mode == "decode" else min(context, args.prefill_tokens)
    p = make_paged_problem(
        [context] * batch, [q_len] * batch if mode == "prefill" else None, g.num_heads,
        g.num_kv_heads, g.head_dim, block_size, dtype, device=device, poison=False, seed=seed,
        spare_blocks=0,
    )  # fmt: skip
    item = p.pool.element_size()
    kv_bytes = 2 * batch * context * g.num_kv_heads * g.head_dim * item

    if mode == "write_kv":
        gen = torch.Generator().manual_seed(seed)
        n = batch * q_len
        k = torch.randn(n, g.num_kv_heads, g.head_dim, generator=gen).to(device, dtype)
        v = torch.randn(n, g.num_kv_heads, g.head_dim, generator=gen).to(device, dtype)
        slots = torch.randperm(p.key_cache.shape[0] * block_size, generator=gen)[:n].to(device)

        def run(config):
            write_kv(k, v, p.key_cache, p.value_cache, slots, config=config)

        def check(config):
            kc, vc = p.key_cache.clone().zero_(), p.value_cache.clone().zero_()
            ref_k, ref_v = kc.clone(), vc.clone()
            write_kv(k, v, kc, vc, slots, config=config)
            reference.write_kv(k, v, ref_k, ref_v, slots)
            return bool(torch.equal(kc, ref_k) and torch.equal(vc, ref_v))

        key = config_key(head_dim=g.head_dim, block_size=block_size, dtype=dtype)
        moved = 2 * 2 * n * g.num_kv_heads * g.head_dim * item  # read K, V; write them
        return Problem("write_kv", key, f"T={n}", moved, run, check)

    block_tables = p.block_tables[:, :-1]  # every sequence fills its row: no padding column
    out = torch.empty_like(p.query)
    scale = g.head_dim**-0.5

    def attend(config, backend=None, dst=out):
        return paged_attention(
            p.query, p.key_cache, p.value_cache, block_tables, p.seq_lens, scale=scale,
            query_start_loc=p.query_start_loc, out=dst, backend=backend, config=config,
        )  # fmt: skip

    reference_out = []  # computed once per shape, on first use

    def check(config):
        if not reference_out:
            reference_out.append(attend(None, "torch", torch.empty_like(p.query)).float())
        got = attend(config, dst=torch.empty_like(p.query)).float()
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        return bool(torch.allclose(got, reference_out[0], atol=tol, rtol=tol))

    key = config_key(head_dim=g.head_dim, block_size=block_size, dtype=dtype, mode=mode)
    moved = kv_bytes + 2 * p.query.numel() * item
    return Problem(
        "paged_attention", key, f"B={batch} ctx={context} q={q_len}", moved, attend, check
    )


# ---- timing -----------------------------------------------------------------------------------
def bench_ms(fn: Callable[[], object], args) -> float:
    if args.interpret:  # no CUDA events: a wall-clock median
        return statistics.median(wall_times(fn, 3)) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")


def _fmt_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


def _bandwidth_cells(nbytes: int, ms: float, roof: float | None) -> str:
    """The GB/s and % of copy columns; dashes where bandwidth means nothing (interpreter)."""
    if roof is None:
        return f"{'-':>8} {'-':>7}"
    gbps = nbytes / (ms * 1e-3) / 1e9
    return f"{gbps:8.1f} {100 * gbps / roof:6.1f}%"


def copy_gbps(device, args) -> float:
    """Device-to-device copy bandwidth (read + write), the roofline the table compares to."""
    import torch

    n = 1 << 28  # 256 MiB
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), args)
    return 2 * n / (ms * 1e-3) / 1e9


# ---- main -------------------------------------------------------------------------------------
def _reexec_interpreted(argv: list[str]) -> int:
    """Triton picks the interpreter when kernels are decorated: run again with it set."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.call([sys.executable, os.path.abspath(__file__), *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.interpret:  # tiny sizes become the defaults: sizes given as flags still win
        parser.set_defaults(**INTERPRET_DEFAULTS)
        args = parser.parse_args(argv)
        os.environ["TRITON_INTERPRET"] = "1"  # before triton / pagedkv.kernels are imported
        if "pagedkv.kernels" in sys.modules or "triton" in sys.modules:
            from pagedkv.kernels import triton_interpreted

            if not triton_interpreted():
                return _reexec_interpreted(argv)
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print(
            "autotune.py tunes the Triton kernels on CUDA and no CUDA device is available. "
            "Run it on a GPU machine, or pass --interpret for a tiny sweep through the Triton "
            "interpreter on CPU (a smoke test; its timings mean nothing).",
            file=sys.stderr,
        )
        return 2
    from pagedkv.kernels import (
        get_tuned_config,
        load_tuned_configs,
        save_tuned_configs,
        set_tuned_config,
    )

    g = geometry(args, parser)
    device = torch.device("cpu" if args.interpret else "cuda")
    dtypes = args.dtype or (["float32"] if args.interpret else ["bfloat16"])
    if args.interpret and "bfloat16" in dtypes:
        parser.error("--interpret computes bfloat16 dots wrongly; use float16 or float32")

    # Interpreter timings measure Python, not memory traffic: no bandwidth is shown for them.
    roof = None if args.interpret else copy_gbps(device, args)
    where = "Triton interpreter on CPU" if args.interpret else torch.cuda.get_device_name(device)
    print(
        f"shapes from {g.source}: {g.num_heads} heads, {g.num_kv_heads} KV heads, head_dim "
        f"{g.head_dim}; block sizes {args.block_size}; dtypes {dtypes}; batch sizes "
        f"{args.batch_sizes}; contexts {args.context_lengths}"
    )
    if roof is None:
        print(f"device: {where}; timings below are the interpreter's (they rank nothing real), "
              "so no bandwidth is shown")  # fmt: skip
    else:
        print(f"device: {where}; copy bandwidth {roof:.1f} GB/s (read + write, same run)")

    best: dict[tuple[str, str], tuple] = {}
    header = f"{'key':28} {'shape':20} {'config':62} {'time':>10} {'GB/s':>8} {'% copy':>7}"
    for dtype_name, block_size, mode in itertools.product(dtypes, args.block_size, args.ops):
        dtype = DTYPES[dtype_name]
        configs = candidates(mode, g, dtype, args.interpret)
        item = torch.empty((), dtype=dtype).element_size()
        shapes, skipped = [], []
        for b, c in itertools.product(args.batch_sizes, args.context_lengths):
            cache_gb = 2 * b * c * g.num_kv_heads * g.head_dim * item / 1e9
            (skipped if cache_gb > args.max_cache_gb else shapes).append((b, c))
        if skipped:
            print(
                f"skipping batch x context {skipped}: K/V over --max-cache-gb {args.max_cache_gb}"
            )
        if not shapes:
            continue
        problems = [make_problem(mode, g, dtype, block_size, b, c, args, device) for b, c in shapes]
        print()
        print(header)
        times: dict[int, list[float]] = {}
        for problem in problems:
            for i, config in enumerate(configs):
                label = json.dumps(config.to_dict()).replace('"', "")
                try:
                    ok = problem.check(config)
                    ms = bench_ms(lambda c=config, p=problem: p.run(c), args) if ok else math.inf
                except Exception as err:  # a config the compiler or the device rejects
                    ok, ms = False, math.inf
                    label += f" ({type(err).__name__})"
                times.setdefault(i, []).append(ms)
                if ok:
                    print(
                        f"{problem.key:28} {problem.shape:20} {label:62} {_fmt_ms(ms):>10} "
                        f"{_bandwidth_cells(problem.bytes_moved, ms, roof)}"
                    )
                else:
                    print(f"{problem.key:28} {problem.shape:20} {label:62} {'rejected':>10}")
        best_per_shape = [min(times[i][j] for i in times) for j in range(len(problems))]
        scores = {
            i: math.exp(statistics.fmean(math.log(t / b) for t, b in zip(ts, best_per_shape)))
            if all(math.isfinite(t) for t in ts)
            else math.inf
            for i, ts in times.items()
        }
        winner = min(scores, key=scores.get)
        if not math.isfinite(scores[winner]):
            print(f"{problems[0].key}: no config ran on every shape; nothing saved for it")
            continue
        best[(problems[0].op, problems[0].key)] = (configs[winner], scores[winner])

    print()
    if not best:
        print(f"nothing written to {args.output}: no config ran correctly on every shape of any "
              "key (see 'rejected' above)", file=sys.stderr)  # fmt: skip
        return 1
    print("best configs (geometric mean of time / best time over the key's shapes):")
    for (op, key), (config, score) in best.items():
        set_tuned_config(op, key, config)
        print(f"  {op:16} {key:30} {config.to_dict()}  ({score:.3f}x the per-shape best)")
    save_tuned_configs(args.output)
    load_tuned_configs(args.output)  # what a user does; check the launchers see them
    for (op, key), (config, _) in best.items():
        assert get_tuned_config(op, key) == config, (op, key)
    print(
        f"wrote {args.output} ({len(best)} configs); launchers use them after "
        f"pagedkv.kernels.load_tuned_configs({args.output!r})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
