"""Correctness check and benchmark of the pagedkv kernels.

On CUDA: checks every op (Triton) against the torch reference on NaN-poisoned paged caches and
fails loudly on a mismatch; then times, with ``triton.testing.do_bench`` (median, p20, p80):

- decode (bf16, 32 query / 8 KV heads, head_dim 128, block 16) at batch x context 64 x 1k,
  16 x 4k and 1 x 8k, and torch SDPA decode on a contiguous cache of the same content;
- write_kv of 4k tokens; copy_blocks of 2 MB blocks (32 layers x K/V x 16 x 8 x 128 bf16).

Memory-bound results are printed in GB/s and as a fraction of a device-to-device copy measured
in the same run, beside the goals. Finishes in well under 4 minutes on an H100 (the first
attention launch autotunes).

On CPU: checks correctness on tiny shapes (through the Triton interpreter when TRITON_INTERPRET=1
is set, else the torch backend) and says that timing needs CUDA.

    python examples/benchmark_kernels.py [--json results.json] [--save-configs tuned.json]
    TRITON_INTERPRET=1 python examples/benchmark_kernels.py     # CPU, real kernels, slow
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import wall_times

from pagedkv.kernels.testing import make_paged_problem

DECODE_SHAPES = [(64, 1024), (16, 4096), (1, 8192)]  # (batch, context)
DECODE_GOALS = {(64, 1024): 0.85, (16, 4096): 0.85, (1, 8192): 0.60}  # fraction of copy BW
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
WRITE_TOKENS = 4096
COPY_LAYERS, COPY_PAIRS = 32, 64
MOVE_GOAL = 0.80  # write_kv and copy_blocks, fraction of copy BW
# Max abs error allowed, relative to the largest |expected| (long contexts average many random
# values, so outputs are small and a plain atol would pass anything).
TOLERANCES = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((out.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------

# seq_lens, q_lens, Hq, Hkv, D, bs, dtype, attention kwargs
GPU_ATTENTION_CASES = [
    ([1, 17, 300, 3000], None, 32, 8, 128, 16, torch.bfloat16, {}),
    ([4000], None, 32, 8, 128, 16, torch.float16, {}),
    ([33, 64, 5], None, 8, 1, 96, 32, torch.float16, {}),
    ([70, 9], None, 4, 4, 80, 8, torch.float32, {}),
    ([200, 40], None, 16, 2, 256, 16, torch.bfloat16, {"sliding_window": 64}),
    ([90, 12], None, 8, 4, 64, 16, torch.float16, {"softcap": 30.0}),
    ([300, 77, 1], [300, 77, 1], 32, 8, 128, 16, torch.bfloat16, {}),
    ([500, 129], [37, 1], 16, 4, 128, 32, torch.float16, {}),
    ([260, 33], [260, 20], 8, 2, 64, 8, torch.float32, {"sliding_window": 50, "softcap": 20.0}),
    ([3, 5], [6, 7], 4, 2, 64, 8, torch.float16, {}),
    ([40, 24], [40, 24], 4, 1, 80, 16, torch.float16, {"causal": False}),
]
CPU_ATTENTION_CASES = [
    ([1, 17, 40], None, 8, 2, 64, 16, torch.float16, {}),
    ([70, 9], None, 4, 4, 80, 8, torch.float32, {"sliding_window": 16}),
    ([30, 12], [30, 5], 4, 1, 64, 16, torch.float32, {"softcap": 10.0}),
    ([3, 5], [6, 7], 4, 2, 64, 8, torch.float16, {}),
]


def fail(message: str) -> None:
    print(f"CHECK FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def check_ops(device: torch.device, backend: str) -> int:
    """Every op on `backend` against the torch reference; exits non-zero on a mismatch."""
    from pagedkv import kernels
    from pagedkv.kernels import reference

    on_gpu = device.type == "cuda"
    interpreted = backend == "triton" and not on_gpu
    cases = GPU_ATTENTION_CASES if on_gpu else CPU_ATTENTION_CASES
    # An explicit (empty = default) config skips autotune here: every shape would tune anew.
    # The timed decode below runs the autotuned config and is checked against SDPA.
    fixed = kernels.KernelConfig()
    checked = 0
    for seq_lens, q_lens, hq, hkv, d, bs, dtype, kwargs in cases:
        if interpreted and dtype == torch.bfloat16:
            continue  # the interpreter computes bf16 tl.dot wrongly
        p = make_paged_problem(
            seq_lens, q_lens, hq, hkv, d, bs, dtype, device=device, spare_blocks=2
        )
        name = f"paged_attention seq_lens={seq_lens} q_lens={q_lens} Hq{hq} Hkv{hkv} D{d} bs{bs} "
        name += f"{str(dtype).removeprefix('torch.')} {kwargs}"
        with kernels.trace_backends() as calls:
            out = kernels.paged_attention(
                p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, scale=d**-0.5,
                query_start_loc=p.query_start_loc, backend=backend, config=fixed, **kwargs,
            )  # fmt: skip
        if calls != [("paged_attention", backend)]:
            fail(f"{name}: ran {calls}, expected {backend}")
        expected = reference.paged_attention(
            p.query.float(), p.key_cache.float(), p.value_cache.float(), p.block_tables,
            p.seq_lens, scale=d**-0.5, query_start_loc=p.query_start_loc, **kwargs,
        )  # fmt: skip
        if out.isnan().any():
            fail(f"{name}: NaN in output (a poisoned slot was read)")
        err = relative_error(out, expected)
        if err > TOLERANCES[dtype]:
            fail(f"{name}: max error {err:.3g} of max |expected| > tolerance {TOLERANCES[dtype]}")
        checked += 1

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        p = make_paged_problem([1, 37, 16], None, 4, 2, 80, 8, dtype, device=device, spare_blocks=2)
        new_key, new_value = torch.randn_like(p.key), torch.randn_like(p.value)
        expected = p.pool.clone()
        reference.write_kv(new_key, new_value, expected[:, 0, 0], expected[:, 0, 1], p.slot_mapping)
        kernels.write_kv(new_key, new_value, p.key_cache, p.value_cache, p.slot_mapping,
                         backend=backend)  # fmt: skip
        if not torch.equal(p.pool.nan_to_num(7.0), expected.nan_to_num(7.0)):
            fail(f"write_kv {dtype}: differs from the reference")
        key, value = kernels.gather_kv(
            p.key_cache, p.value_cache, p.block_tables, p.seq_lens, backend=backend
        )
        if not (torch.equal(key, new_key) and torch.equal(value, new_value)):
            fail(f"gather_kv {dtype}: not the inverse of write_kv")

        layers = 3
        pool = torch.randn(6, layers, 2, 8, 2, 64, device=device).to(dtype)
        separate = [torch.randn(6, 8, 2, 64, device=device).to(dtype) for _ in range(2 * layers)]
        mapping = torch.tensor([[1, 4], [2, 5]], device=device)
        for keys, values in (
            ([pool[:, i, 0] for i in range(layers)], [pool[:, i, 1] for i in range(layers)]),
            (separate[:layers], separate[layers:]),
        ):
            want_k, want_v = [k.clone() for k in keys], [v.clone() for v in values]
            reference.copy_blocks(want_k, want_v, mapping)
            kernels.copy_blocks(keys, values, mapping, backend=backend)
            pairs = zip(keys + values, want_k + want_v, strict=True)
            if not all(torch.equal(a, b) for a, b in pairs):
                fail(f"copy_blocks {dtype}: differs from the reference")
        checked += 3
    return checked


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def timer(device: torch.device) -> Callable[[Callable[[], object]], tuple[float, float, float]]:
    """(median, p20, p80) milliseconds of fn(): do_bench on CUDA, wall clock otherwise."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))

    def wall(fn: Callable[[], object]) -> tuple[float, float, float]:
        times = [t * 1e3 for t in wall_times(fn, 5)]
        return statistics.median(times), times[1], times[3]

    return wall


def run_timings(device: torch.device, backend: str, *, smoke: bool) -> list[dict]:
    """Time every benchmark; `smoke` shrinks the shapes (checks the script, not the numbers)."""
    from pagedkv import kernels

    bench = timer(device)
    interpreted = backend == "triton" and device.type != "cuda"
    dtype = torch.float16 if interpreted else torch.bfloat16  # interpreter: bf16 tl.dot is wrong
    elem = torch.finfo(dtype).bits // 8
    results = []

    def record(name: str, ms: tuple[float, float, float], nbytes: int, **extra) -> dict:
        row = {"name": name, "ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2]}
        row["gbps"] = nbytes / ms[0] / 1e6
        row.update(extra)
        results.append(row)
        return row

    copy_mb = 8 if smoke else 1024
    src = torch.empty(copy_mb * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = record("device copy", bench(lambda src=src, dst=dst: dst.copy_(src)), 2 * src.numel())
    copy_gbps = copy["gbps"]
    del src, dst

    for full_batch, full_context in DECODE_SHAPES:
        goal = DECODE_GOALS[(full_batch, full_context)]
        batch, context = full_batch, full_context
        if smoke:
            batch, context = max(1, batch // 16), context // 64
        p = make_paged_problem(
            [context] * batch, None, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, dtype,
            device=device, poison=False, spare_blocks=2,
        )  # fmt: skip
        kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * elem
        nbytes = kv_bytes + 2 * p.query.numel() * elem
        out = torch.empty_like(p.query)
        args = (p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens)
        scale = HEAD_DIM**-0.5

        def paged(args=args, out=out, scale=scale):
            kernels.paged_attention(*args, scale=scale, out=out, backend=backend)

        paged_row = record(
            f"decode paged {batch}x{context}", bench(paged), nbytes, goal_fraction=goal
        )
        key, value = kernels.gather_kv(
            p.key_cache, p.value_cache, p.block_tables, p.seq_lens, backend="torch"
        )
        k = key.view(batch, context, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
        v = value.view(batch, context, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
        q = p.query.view(batch, NUM_Q_HEADS, 1, HEAD_DIM)

        def sdpa(q=q, k=k, v=v, scale=scale):
            F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

        sdpa_row = record(f"decode SDPA contiguous {batch}x{context}", bench(sdpa), nbytes)
        expected = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        err = relative_error(out, expected.view_as(out))
        if err > TOLERANCES[dtype]:
            fail(f"timed decode {batch}x{context}: max error {err:.3g} of max |SDPA| vs SDPA")
        paged_row["sdpa_ms"] = sdpa_row["ms"]
        del p, key, value, k, v

    num_blocks = WRITE_TOKENS // BLOCK_SIZE * (2 if smoke else 4)
    tokens = WRITE_TOKENS // (64 if smoke else 1)
    pool = torch.zeros(num_blocks, 4, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype,
                       device=device)  # fmt: skip
    key = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device=device).to(dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:tokens]

    def write(pool=pool, key=key, value=value, slots=slots):
        kernels.write_kv(key, value, pool[:, 1, 0], pool[:, 1, 1], slots, backend=backend)

    record(f"write_kv {tokens} tokens", bench(write), 2 * 2 * key.numel() * elem,
           goal_fraction=MOVE_GOAL)  # fmt: skip
    del pool, key, value

    layers, pairs = (4, 4) if smoke else (COPY_LAYERS, COPY_PAIRS)
    pool = torch.zeros(2 * pairs + 1, layers, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                       dtype=dtype, device=device)  # fmt: skip
    mapping = torch.stack([torch.arange(pairs), torch.arange(pairs) + pairs], 1).to(device)
    keys = [pool[:, i, 0] for i in range(layers)]
    values = [pool[:, i, 1] for i in range(layers)]
    block_bytes = pool[0].numel() * elem

    def copy_blocks(keys=keys, values=values, mapping=mapping):
        kernels.copy_blocks(keys, values, mapping, backend=backend)

    record(f"copy_blocks {pairs} x {block_bytes // 1024} KB blocks", bench(copy_blocks),
           2 * pairs * block_bytes, goal_fraction=MOVE_GOAL)  # fmt: skip

    for row in results:
        row["fraction_of_copy"] = row["gbps"] / copy_gbps
    return results


def report(results: list[dict]) -> None:
    print(f"\n{'benchmark':<40} {'median ms':>10} {'p20-p80 ms':>17} {'GB/s':>8} {'of copy':>8}"
          "  goal")  # fmt: skip
    for row in results:
        goals = []
        if row.get("goal_fraction") is not None:
            ok = row["fraction_of_copy"] >= row["goal_fraction"]
            goals.append(f">= {row['goal_fraction']:.0%} of copy: {'MET' if ok else 'MISSED'}")
        if "sdpa_ms" in row:
            ok = row["ms"] <= row["sdpa_ms"]
            goals.append(
                f"<= SDPA contiguous ({row['sdpa_ms']:.3f} ms): {'MET' if ok else 'MISSED'}"
            )
        spread = f"{row['ms_p20']:.3f}-{row['ms_p80']:.3f}"
        print(f"{row['name']:<40} {row['ms']:>10.3f} {spread:>17} {row['gbps']:>8.1f} "
              f"{row['fraction_of_copy']:>8.1%}  {'; '.join(goals)}")  # fmt: skip


def correctness_line(checked: int, backend: str, backend_name: str) -> str:
    """What the checks compared: on the torch backend the op under test is the reference's own
    code, so passing them says the script works, not that any kernel does."""
    if backend != "torch":
        return (
            f"correctness: {checked} checks passed: the {backend_name} kernels against the "
            "torch reference (attention: reference in float32; write/copy/gather: exact)"
        )
    return (
        f"correctness: {checked} checks passed, but the backend here is the torch reference "
        "itself (no CUDA, TRITON_INTERPRET unset): they compare the reference in each cache "
        "dtype with the reference in float32, which checks this script, not the Triton "
        "kernels. For those: TRITON_INTERPRET=1 python examples/benchmark_kernels.py (CPU, "
        "slow), or a CUDA machine"
    )


def save_configs(path: str) -> bool:
    """Write the configs autotune picked in this run (and any loaded) to `path`; False, with the
    reason and nothing written, if there are none."""
    import tempfile

    from pagedkv import kernels

    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("r", suffix=".json", dir=folder, delete=False) as tmp:
        try:
            kernels.save_tuned_configs(tmp.name)
            count = sum(len(table) for table in json.load(tmp).values())
            if count:
                os.replace(tmp.name, path)
        finally:
            if os.path.exists(tmp.name):
                os.remove(tmp.name)
    if not count:
        print(f"nothing written to {path}: no kernel was autotuned in this run (autotune runs "
              "on CUDA, for the timed launches; --check-only and CPU runs use fixed configs)",
              file=sys.stderr)  # fmt: skip
        return False
    print(f"{count} tuned configs written to {path} (load with load_tuned_configs)")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write results (and checks) as JSON")
    parser.add_argument(
        "--save-configs",
        metavar="PATH",
        help="write the configs autotune picked (load with load_tuned_configs)",
    )
    parser.add_argument(
        "--check-only",
        action="store_true",
        help="check correctness against the reference, skip timing",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="run the timing code on tiny shapes on any device (numbers "
                        "meaningless; checks the script itself)")  # fmt: skip
    args = parser.parse_args(argv)

    from pagedkv import kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = kernels.resolve_backend(None, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if backend == "triton" and device.type == "cpu":
        backend_name = "triton (interpreter)"
    else:
        backend_name = backend
    print(f"device: {name}, backend: {backend_name}, torch {torch.__version__}")
    start = time.perf_counter()
    checked = check_ops(device, backend)
    print(f"{correctness_line(checked, backend, backend_name)} "
          f"({time.perf_counter() - start:.1f} s)")  # fmt: skip

    output: dict = {"device": str(device), "backend": backend, "checks_passed": checked}
    if args.check_only:
        print("timing skipped (--check-only)")
    elif device.type == "cuda" or args.smoke:
        results = run_timings(device, backend, smoke=args.smoke or device.type != "cuda")
        report(results)
        output["results"] = results
        if args.smoke and device.type != "cuda":
            print("\n(smoke run: shapes shrunk, wall-clock timing on CPU; numbers are meaningless)")
    else:
        print("timing needs CUDA: no GPU here, so only correctness was checked.")
    status = 0
    if args.save_configs and not save_configs(args.save_configs):
        status = 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(output, f, indent=2)
        print(f"results written to {args.json}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
