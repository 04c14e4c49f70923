"""The GPU check: one run that measures everything pagedkv needs measured on a GPU.

    python examples/benchmark_kernels.py --json gpu.json --markdown gpu.md   # on a CUDA machine

Sections, each with its share of `--budget-s` (default 380 s; under 8 minutes on one H100
with the imports and the report), each recorded in the JSON and the markdown even when it
fails part way (an error's last line is kept and the next section runs):

  checks    every op (Triton) against the torch reference on NaN-poisoned paged caches:
            attention in bf16, fp16, fp32 (decode, GQA/MQA, split-K, prefill, prefill over a
            cached prefix, sliding window, softcap, sinks, slot_valid holes), and
            write_kv / gather_kv / copy_blocks exactly (`_gpu_checks.py`)
  kernels   default-config timings (do_bench median, p20, p80) against a measured device
            copy and SDPA on a contiguous cache: decode at 64 x 1k, 16 x 4k, 1 x 8k and a
            4 x 2k prefill on the 32-layer production pool and a one-layer pool; write_kv,
            copy_blocks (`_gpu_kernels.py`)
  generate  model.generate stock vs paged on a random 1B-shaped bf16 Llama: a batch of 64
            decodes, 4 beams, a call reusing a 2k-token prefix; tokens/s, KV memory, tokens
            compared (`_gpu_generate.py`)
  batching  the same model serving 64 requests: pagedkv's generate_batch vs transformers'
            continuous batching vs static generate (`_gpu_batching.py`)

The report (`_gpu_report.py`) is printed, and written with `--markdown`, under a heading with
the card's name, ready for docs/benchmarks.md. Exits 1 if a check failed or a section raised.

Without CUDA only `checks` runs (the torch backend, or the real kernels through the Triton
interpreter with TRITON_INTERPRET=1: slow); `--smoke` runs every section on tiny shapes and
models on any device (the torch reference on CPU; numbers meaningless, nothing judged).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from _common import int_at_least
from _gpu_budget import run_section, split_budget
from _gpu_report import markdown, problems

SECTIONS = {"checks": 0.3, "kernels": 0.2, "generate": 0.25, "batching": 0.25}  # budget weights
DEFAULT_BUDGET_S = 380
MIN_SECTION_S = 5.0  # a section is not started with less time than this


def correctness_line(checked: int, backend: str, backend_name: str) -> str:
    """What the checks compared: on the torch backend the op under test is the reference's own
    code, so passing them says the script works, not that any kernel does."""
    if backend != "torch":
        return (
            f"correctness: {checked} checks passed: the {backend_name} kernels against the "
            "torch reference (attention: reference in float64; write/copy/gather: exact)"
        )
    return (
        f"correctness: {checked} checks passed, but the backend here is the torch reference "
        "itself (no CUDA, TRITON_INTERPRET unset): they compare the reference in each cache "
        "dtype with the reference in float64, which checks this script, not the Triton "
        "kernels. For those: TRITON_INTERPRET=1 python examples/benchmark_kernels.py (CPU, "
        "slow), or a CUDA machine"
    )


@contextlib.contextmanager
def torch_backend_on_cpu(device: torch.device) -> Iterator[None]:
    """On CPU, the end-to-end sections run the torch reference (PAGEDKV_BACKEND=torch for the
    block), also under TRITON_INTERPRET=1, whose interpreter is far too slow to serve."""
    if device.type == "cuda":
        yield
        return
    saved = os.environ.get("PAGEDKV_BACKEND")
    os.environ["PAGEDKV_BACKEND"] = "torch"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PAGEDKV_BACKEND"]
        else:
            os.environ["PAGEDKV_BACKEND"] = saved


def versions(device: torch.device) -> dict:
    import transformers
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "pagedkv": _commit()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))  # fmt: skip
    return info


def _commit() -> str | None:
    """The checkout's commit (with -dirty if changed), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def section_runners(device: torch.device, backend: str, smoke: bool) -> dict:
    """name -> fn(budget, out) for `run_section`; the end-to-end sections share one model."""
    from _gpu_batching import run_batching
    from _gpu_checks import run_checks
    from _gpu_generate import LazyModel, run_generate
    from _gpu_kernels import run_kernels

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timed = backend if device.type == "cuda" else "torch"  # never time the interpreter
    lazy = LazyModel(device, dtype, smoke=smoke)

    def end_to_end(run):
        def section(budget, out):
            with torch_backend_on_cpu(device):
                run(budget, out, lazy, smoke=smoke)

        return section

    return {
        "checks": lambda budget, out: run_checks(budget, out, device, backend),
        "kernels": lambda budget, out: run_kernels(budget, out, device, timed, smoke=smoke),
        "generate": end_to_end(run_generate),
        "batching": end_to_end(run_batching),
    }


def chosen_sections(args, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(sections to run, {section: why skipped})."""
    wanted = ["checks"] if args.check_only else args.only or list(SECTIONS)
    wanted = [name for name in SECTIONS if name in wanted]
    if device.type == "cuda" or args.smoke:
        return wanted, {}
    skipped = {name: "needs CUDA (--smoke runs it on tiny shapes on any device)"
               for name in wanted if name != "checks"}  # fmt: skip
    return [name for name in wanted if name not in skipped], skipped


def run_all(names: list[str], runners: dict, total_s: float) -> dict[str, dict]:
    """Each section in turn with its share of the time left; prints a line per section."""
    start = time.perf_counter()
    weights = {name: SECTIONS[name] for name in names}
    records = {}
    for name in names:
        left = total_s - (time.perf_counter() - start)
        budget_s = split_budget(left, weights, name)
        weights.pop(name)
        if budget_s < MIN_SECTION_S:
            records[name] = {"status": "skipped", "reason": "out of time", "result": {}}
            print(f"[{name}] skipped: {budget_s:.0f} s left for it", flush=True)
            continue
        print(f"[{name}] running (budget {budget_s:.0f} s)", flush=True)
        records[name] = run_section(name, runners[name], budget_s)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        record = records[name]
        found = problems(record)
        print(f"[{name}] {record['status']} in {record['seconds']:.0f} s"
              + (": " + "; ".join(found[:5]) if found else ""), flush=True)  # fmt: skip
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    parser.add_argument("--markdown", metavar="PATH", help="write the report (also printed)")
    parser.add_argument("--only", choices=list(SECTIONS), action="append",
                        help="run only this section (repeatable)")  # fmt: skip
    parser.add_argument("--check-only", action="store_true",
                        help="only the correctness checks (same as --only checks)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="every section on tiny shapes and models, on any device (checks "
                        "the script; numbers meaningless, goals not judged)")  # fmt: skip
    parser.add_argument("--budget-s", type=int_at_least(1), default=DEFAULT_BUDGET_S,
                        help="seconds for all sections together, shared by weight; a section "
                        "that finishes early leaves its time to the next (default "
                        f"{DEFAULT_BUDGET_S})")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pagedkv import kernels

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = kernels.resolve_backend(None, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    interpreted = backend == "triton" and device.type == "cpu"
    backend_name = "triton (interpreter)" if interpreted else backend
    print(f"device: {name}, backend: {backend_name}, torch {torch.__version__}", flush=True)

    names, skipped = chosen_sections(args, device)
    records = run_all(names, section_runners(device, backend, args.smoke), args.budget_s)
    for section, why in skipped.items():
        records[section] = {"status": "skipped", "reason": why, "result": {}}
        print(f"[{section}] skipped: {why}")
    checks = records.get("checks", {}).get("result", {})
    if "passed" in checks:
        print(correctness_line(checks["passed"], backend, backend_name))

    results = {
        "device": name, "device_type": device.type, "backend": backend_name,
        "smoke": args.smoke, "date": datetime.date.today().isoformat(),
        "command": " ".join(["python examples/benchmark_kernels.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "versions": versions(device), "budget_s": args.budget_s,
        "sections": {s: records[s] for s in SECTIONS if s in records},
    }  # fmt: skip
    results["total_s"] = time.perf_counter() - started
    found = [f"{s}: {p}" for s, r in results["sections"].items() for p in problems(r)]
    results["problems"] = found
    report = markdown(results)
    print("\n" + report)
    if args.markdown:
        Path(args.markdown).write_text(report)
        print(f"report written to {args.markdown}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {args.json}")
    if found:
        print(f"CHECK FAILED: {len(found)} problem(s):\n  " + "\n  ".join(found), file=sys.stderr)
    print(f"total {results['total_s']:.1f} s")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
