"""Kernel timing section of `benchmark_kernels.py`: the launchers as users call them (no
`config=`: the shipped default configs, or tuned ones loaded with `load_tuned_configs`),
timed with `triton.testing.do_bench` (median, p20, p80) on CUDA; wall clock medians elsewhere.

- A device-to-device copy, measured first: the bandwidth memory-bound results are compared to.
- Decode (bf16, 32 query / 8 KV heads, head_dim 128, block 16) at batch x context 64 x 1k,
  16 x 4k, 1 x 8k, and one causal prefill (4 x 2k), each on two layouts of the same content:
  the production pool (``[num_blocks, 32 layers, 2, block_size, heads, dim]``, caches the
  strided views ``pool[:, 0, 0]`` and ``pool[:, 0, 1]``: consecutive blocks of one layer are
  2 MiB apart) and a one-layer pool; and torch SDPA on a contiguous cache of the same content
  (GQA by `enable_gqa`). Each paged output is checked against SDPA's.
- write_kv of 4k tokens (both layouts) and copy_blocks of 64 blocks of 2 MiB (32 layers; the
  caches given per layer and stacked as one tensor each).

Goals (docs/benchmarks.md): decode >= 85% of copy bandwidth at 64 x 1k and 16 x 4k, >= 60% at
1 x 8k, and no slower than SDPA on contiguous K/V; write_kv and copy_blocks >= 80% of copy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import wall_times
from _gpu_budget import Budget, last_line
from _gpu_checks import TOLERANCES, relative_error

from pagedkv import kernels
from pagedkv.kernels.testing import make_paged_problem

HQ, HKV, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DECODE_GOALS = {(64, 1024): 0.85, (16, 4096): 0.85, (1, 8192): 0.60}  # fraction of copy BW
MOVE_GOAL = 0.80  # write_kv and copy_blocks, fraction of copy BW


@dataclass(frozen=True)
class Sizes:
    """What the section runs: full sizes on a GPU, tiny ones for the smoke run."""

    copy_mib: int
    layers: int  # layers of the production pool
    decode: tuple[tuple[int, int], ...]  # (batch, context)
    prefill: tuple[int, int]  # (batch, prompt length)
    write_tokens: int
    copy_pairs: int


FULL = Sizes(1024, 32, ((64, 1024), (16, 4096), (1, 8192)), (4, 2048), 4096, 64)
SMOKE = Sizes(8, 4, ((4, 16), (1, 64), (1, 128)), (2, 32), 64, 4)


def timer(device: torch.device) -> Callable[[Callable[[], object]], tuple[float, float, float]]:
    """(median, p20, p80) milliseconds of fn(): do_bench on CUDA, wall clock otherwise."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))

    def wall(fn: Callable[[], object]) -> tuple[float, float, float]:
        times = [t * 1e3 for t in wall_times(fn, 5)]
        return statistics.median(times), times[1], times[3]

    return wall


class Recorder:
    """Appends timed rows to `out["rows"]`, with GB/s and the fraction of the copy's."""

    def __init__(self, out: dict, device: torch.device) -> None:
        self.rows = out.setdefault("rows", [])
        self.bench = timer(device)
        self.copy_gbps: float | None = None

    def time(self, fn, *, op: str, shape: str, layout: str, nbytes: int, **extra) -> dict:
        ms = self.bench(fn)
        row = {"op": op, "shape": shape, "layout": layout, "ms": ms[0], "ms_p20": ms[1],
               "ms_p80": ms[2], "gbps": nbytes / ms[0] / 1e6, **extra}  # fmt: skip
        if self.copy_gbps:
            row["fraction_of_copy"] = row["gbps"] / self.copy_gbps
        self.rows.append(row)
        return row


def time_copy(rec: Recorder, device: torch.device, sizes: Sizes) -> None:
    src = torch.empty(sizes.copy_mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    row = rec.time(lambda: dst.copy_(src), op="device copy", shape=f"{sizes.copy_mib} MiB",
                   layout="contiguous", nbytes=2 * src.numel())  # fmt: skip
    rec.copy_gbps = row["gbps"]
    row["fraction_of_copy"] = 1.0


def _layouts(p, layers: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(key_cache, value_cache) of the problem's pool (`layers` layers, layer 0) and of a
    one-layer copy of it: the same blocks, block tables and content."""
    one = p.pool[:, :1].clone()
    return {
        f"pool {layers} layers": (p.key_cache, p.value_cache),
        "pool 1 layer": (one[:, 0, 0], one[:, 0, 1]),
    }


def _contiguous(t: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Packed [batch * length, H, D] -> [batch, H, length, D], contiguous (SDPA's layout)."""
    return t.view(batch, length, *t.shape[1:]).transpose(1, 2).contiguous()


def time_attention(rec: Recorder, out: dict, device, backend: str, sizes: Sizes,
                   batch: int, context: int, q_len: int | None) -> None:  # fmt: skip
    """Paged attention on both layouts, and SDPA on a contiguous cache, of one shape (decode
    when q_len is None, else a causal prefill of q_len == context queries per sequence)."""
    decode = q_len is None
    p = make_paged_problem(
        [context] * batch, None if decode else [context] * batch, HQ, HKV, HEAD_DIM,
        BLOCK_SIZE, torch.bfloat16, device=device, poison=False, spare_blocks=2,
        num_layers=sizes.layers,
    )  # fmt: skip
    shape = f"{batch}x{context}"
    q = p.query.view(batch, -1, HQ, HEAD_DIM).transpose(1, 2)
    k, v = _contiguous(p.key, batch, context), _contiguous(p.value, batch, context)
    scale = HEAD_DIM**-0.5

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=not decode,
                                              enable_gqa=True)  # fmt: skip

    elem = 2  # bf16
    kv_bytes = 2 * batch * context * HKV * HEAD_DIM * elem
    extra: dict = {"nbytes": kv_bytes + 2 * p.query.numel() * elem}  # K, V, query, output
    if not decode:  # the two causal matmuls: 2 x 2 flops per multiply-add
        extra["flops"] = 4 * batch * HQ * HEAD_DIM * context * (context + 1) // 2
    op = "decode" if decode else "prefill"
    base = rec.time(sdpa, op=op, shape=shape, layout="SDPA contiguous", **extra)
    expected = sdpa().transpose(1, 2).reshape(p.query.shape)
    goal = DECODE_GOALS.get((batch, context)) if decode else None
    for layout, (key_cache, value_cache) in _layouts(p, sizes.layers).items():
        result = torch.empty_like(p.query)

        def paged(key_cache=key_cache, value_cache=value_cache, result=result):
            kernels.paged_attention(p.query, key_cache, value_cache, p.block_tables,
                                    p.seq_lens, scale=scale, query_start_loc=p.query_start_loc,
                                    out=result, backend=backend)  # fmt: skip

        row = rec.time(paged, op=op, shape=shape, layout=layout, goal_fraction=goal,
                       sdpa_ms=base["ms"], **extra)  # fmt: skip
        error = relative_error(result, expected)
        row["error_vs_sdpa"] = error
        if error > TOLERANCES[torch.bfloat16] or result.isnan().any():
            out["failures"].append(f"{op} {shape} {layout}: max error {error:.3g} vs SDPA")


def time_write_kv(rec: Recorder, device, backend: str, sizes: Sizes) -> None:
    tokens = sizes.write_tokens
    num_blocks = tokens // BLOCK_SIZE * 4
    pool = torch.zeros(num_blocks, sizes.layers, 2, BLOCK_SIZE, HKV, HEAD_DIM,
                       dtype=torch.bfloat16, device=device)  # fmt: skip
    one = torch.zeros_like(pool[:, :1])
    key = torch.randn(tokens, HKV, HEAD_DIM, device=device).to(torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:tokens]
    for layout, target in ((f"pool {sizes.layers} layers", pool), ("pool 1 layer", one)):

        def write(target=target):
            kernels.write_kv(key, value, target[:, 0, 0], target[:, 0, 1], slots, backend=backend)

        rec.time(write, op="write_kv", shape=f"{tokens} tokens", layout=layout,
                 nbytes=2 * 2 * key.numel() * 2, goal_fraction=MOVE_GOAL)  # fmt: skip


def time_copy_blocks(rec: Recorder, device, backend: str, sizes: Sizes) -> None:
    pairs, layers = sizes.copy_pairs, sizes.layers
    pool = torch.zeros(2 * pairs + 1, layers, 2, BLOCK_SIZE, HKV, HEAD_DIM,
                       dtype=torch.bfloat16, device=device)  # fmt: skip
    mapping = torch.stack([torch.arange(pairs), torch.arange(pairs) + pairs], 1).to(device)
    block_bytes = pool[0].numel() * 2
    per_layer = ([pool[:, i, 0] for i in range(layers)], [pool[:, i, 1] for i in range(layers)])
    stacked = (pool[:, :, 0], pool[:, :, 1])  # one tensor per K / V: checks once, any layers
    for how, (keys, values) in (("per-layer views", per_layer), ("stacked", stacked)):

        def copy_blocks(keys=keys, values=values):
            kernels.copy_blocks(keys, values, mapping, backend=backend)

        rec.time(copy_blocks, op="copy_blocks", shape=f"{pairs} x {block_bytes // 1024} KiB",
                 layout=f"pool {layers} layers, {how}", nbytes=2 * pairs * block_bytes,
                 goal_fraction=MOVE_GOAL)  # fmt: skip


def run_kernels(budget: Budget, out: dict, device, backend: str, *, smoke: bool) -> None:
    """Fill `out`: rows (one per timing), failures, skipped. Each step runs only if the time
    left is at least twice what it is expected to take (a rough guess per step)."""
    sizes = SMOKE if smoke else FULL
    rec = Recorder(out, device)
    out.update(failures=[], skipped=[], sizes=sizes.__dict__, copy_gbps=None)
    steps = [("device copy", 2, lambda: time_copy(rec, device, sizes))]
    for batch, context in sizes.decode:
        steps.append((f"decode {batch}x{context}", 8, lambda b=batch, c=context:
                      time_attention(rec, out, device, backend, sizes, b, c, None)))  # fmt: skip
    batch, length = sizes.prefill
    steps.append((f"prefill {batch}x{length}", 6, lambda:
                  time_attention(rec, out, device, backend, sizes, batch, length, length)))  # fmt: skip
    steps.append(("write_kv", 3, lambda: time_write_kv(rec, device, backend, sizes)))
    steps.append(("copy_blocks", 3, lambda: time_copy_blocks(rec, device, backend, sizes)))
    for name, estimate_s, step in steps:
        if not budget.allows(2 * estimate_s):
            out["skipped"].append(f"{name}: out of time")
            continue
        t0 = time.perf_counter()
        try:
            step()
        except Exception as err:  # recorded; the next step runs
            out["failures"].append(f"{name}: raised {last_line(err)}")
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        out["copy_gbps"] = rec.copy_gbps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in out["rows"]:
        row["meets"] = verdicts(row)
        if "flops" in row:
            row["tflops"] = row["flops"] / row["ms"] / 1e9


def verdicts(row: dict) -> dict[str, bool]:
    """Each goal the row has: of copy bandwidth, and no slower than SDPA."""
    meets = {}
    if row.get("goal_fraction") is not None and row.get("fraction_of_copy") is not None:
        meets["of_copy"] = row["fraction_of_copy"] >= row["goal_fraction"]
    if row.get("sdpa_ms") is not None and row["op"] == "decode":
        meets["vs_sdpa"] = row["ms"] <= row["sdpa_ms"]
    return meets
