"""Benchmarks of pagedkv against what users run today.

    python examples/benchmark.py                 # every section
    python examples/benchmark.py --only manager  # one section

Sections:
  manager   the manager's per-step overhead: one decode step for N sequences = append one
            token to each + build the block tables and seq lens (goal: <= 200 us at 256 seqs).

Times are medians over repeats, measured in this run; ratios compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from pagedkv.kvcache import KVCacheConfig, KVCacheManager


def median_time(fn: Callable[[], object], repeats: int, inner: int = 1) -> float:
    """Median seconds per call of `fn` over `repeats` timed batches of `inner` calls."""
    fn()  # warm up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def bench_manager(num_seqs: int = 256, context: int = 512, repeats: int = 21) -> dict:
    """Per-step cost of the manager's decode hot path for `num_seqs` sequences."""
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

    def step():
        mgr.append_batch(seq_ids, 1)
        mgr.block_tables(seq_ids)
        mgr.seq_lens(seq_ids)

    per_step = median_time(step, repeats, inner=20)
    mgr.check_invariants()
    return {
        "num_seqs": num_seqs,
        "context": context,
        "us_per_step": per_step * 1e6,
        "goal_us": 200.0,
        "meets_goal": per_step * 1e6 <= 200.0,
    }


SECTIONS = {"manager": bench_manager}


def main(argv: list[str] | None = None) -> int:
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
        "--num-seqs", type=int, default=256, help="sequences for the manager section"
    )
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.num_seqs < 1:
        parser.error(f"--num-seqs must be >= 1; got {args.num_seqs}")

    torch.manual_seed(0)
    results: dict = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    for name in args.only or list(SECTIONS):
        if name == "manager":
            r = bench_manager(num_seqs=args.num_seqs)
            results["manager"] = r
            verdict = "meets" if r["meets_goal"] else "MISSES"
            print(
                f"manager: decode step for {r['num_seqs']} sequences "
                f"(append 1 token + block tables + seq lens): {r['us_per_step']:.1f} us/step "
                f"({verdict} the <= {r['goal_us']:.0f} us goal)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
