"""Correctness section of `benchmark_kernels.py`: every op on the backend under test against
the torch reference, on NaN-poisoned caches in a block-major pool (strided views, as in
production; see `pagedkv.kernels.testing`).

- paged_attention: bf16, fp16 and fp32 for each feature (decode with GQA/MQA and split-K,
  prefill, prefill over a cached prefix, sliding window, softcap, attention sinks, slot_valid
  holes, queries that see no key, non-causal), against the reference in float64. The error is
  the largest absolute difference relative to the largest |expected| (long contexts average
  many random values, so outputs are small and a plain atol would pass anything); tolerances
  are per dtype. Cases run dtype by dtype, bf16 first, so a short budget drops fp32 first.
- write_kv, gather_kv, copy_blocks: exact (`torch.equal`), each dtype; on CUDA also gather_kv
  of one context longer than CUDA's grid y-limit (65,535).
- On CUDA: a decode step's launches (write_kv, then paged_attention with split-K) captured in a
  CUDA graph and replayed on new inputs give exactly what the same launches give eagerly: no
  host sync, no autotune and no compile inside them.

A failed check is recorded with its reason and the section goes on; so is an op that raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from _gpu_budget import Budget, last_line

from pagedkv import kernels
from pagedkv.kernels.testing import make_paged_problem

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
ALL = (BF16, F16, F32)
TOLERANCES = {F32: 1e-4, F16: 5e-3, BF16: 2e-2}  # max |error| / max |expected|
RESERVE_S = 2.0  # a case is not started with less than this left


@dataclass(frozen=True)
class Case:
    """One paged_attention problem; run once per dtype in `dtypes`."""

    name: str
    seq_lens: list[int]
    q_lens: list[int] | None  # None: decode
    hq: int
    hkv: int
    d: int
    bs: int
    kwargs: dict = field(default_factory=dict)  # causal, sliding_window, softcap
    sinks: bool = False
    holes: dict[int, list[int]] | None = None  # slot_valid: {sequence: positions not attended}
    dtypes: tuple[torch.dtype, ...] = ALL


# Case tables, one case a line (or two).
# fmt: off
def _gpu_cases() -> list[Case]:
    return [
        Case("decode GQA 4:1, lengths 1..3000", [1, 17, 300, 3000], None, 32, 8, 128, 16),
        Case("decode split-K, 8k context", [8000], None, 32, 8, 128, 16, dtypes=(BF16, F16)),
        Case("decode MQA, D96, block 32", [33, 64, 5], None, 8, 1, 96, 32, dtypes=(BF16, F16)),
        Case("decode MHA, D80, block 8", [70, 9], None, 4, 4, 80, 8),
        Case("decode sliding window 64, D256", [200, 40], None, 16, 2, 256, 16,
             {"sliding_window": 64}, dtypes=(BF16, F32)),
        Case("decode softcap 30", [90, 12], None, 8, 4, 64, 16, {"softcap": 30.0}),
        Case("decode sinks", [300, 7], None, 16, 4, 64, 16, sinks=True),
        Case("decode slot_valid holes", [100, 40], None, 8, 2, 128, 16,
             holes={0: [3, 50, 51], 1: list(range(30, 40))}),
        Case("prefill GQA", [300, 77, 1], [300, 77, 1], 32, 8, 128, 16),
        Case("prefill over a cached prefix", [500, 129], [37, 1], 16, 4, 128, 32),
        Case("prefill sliding window 50 + softcap 20", [260, 33], [260, 20], 8, 2, 64, 8,
             {"sliding_window": 50, "softcap": 20.0}),
        Case("prefill sinks + sliding window 32", [200, 64], [200, 16], 8, 2, 64, 16,
             {"sliding_window": 32}, sinks=True, dtypes=(BF16, F32)),
        Case("prefill slot_valid (right padding)", [120, 60], [120, 60], 8, 2, 64, 16,
             holes={1: list(range(50, 60))}, dtypes=(BF16, F16)),
        Case("queries that see no key (q_len > seq_len)", [3, 5], [6, 7], 4, 2, 64, 8),
        Case("non-causal prefill", [40, 24], [40, 24], 4, 1, 80, 16, {"causal": False},
             dtypes=(BF16, F16)),
    ]


def _cpu_cases() -> list[Case]:
    """Small shapes: the Triton interpreter is slow (and skips bf16: it computes bf16 tl.dot
    wrongly); the torch backend runs them all."""
    return [
        Case("decode GQA", [1, 17, 40], None, 8, 2, 64, 16, dtypes=(BF16, F16)),
        Case("decode sliding window 16, D80", [70, 9], None, 4, 4, 80, 8,
             {"sliding_window": 16}, dtypes=(F32,)),
        Case("decode sinks + slot_valid", [40, 9], None, 4, 2, 64, 8, sinks=True,
             holes={0: [2, 30]}, dtypes=(BF16, F32)),
        Case("prefill over a cached prefix, softcap", [30, 12], [30, 5], 4, 1, 64, 16,
             {"softcap": 10.0}, dtypes=(BF16, F32)),
        Case("queries that see no key (q_len > seq_len)", [3, 5], [6, 7], 4, 2, 64, 8,
             dtypes=(F16,)),
    ]
# fmt: on


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-6)
    return ((out.double() - expected).abs().max() / scale).item()


def _sinks(hq: int, device: torch.device) -> torch.Tensor:
    """Sinks around the scores' own scale (q.k * scale ~ N(0, 1)), so they matter."""
    gen = torch.Generator().manual_seed(1000)
    return (torch.randn(hq, generator=gen) * 2 + 1).to(device)


def check_attention(case: Case, dtype: torch.dtype, device: torch.device, backend: str) -> dict:
    """One case in one dtype: {name, dtype, error, tolerance, ok, reason}."""
    p = make_paged_problem(case.seq_lens, case.q_lens, case.hq, case.hkv, case.d, case.bs, dtype,
                           device=device, spare_blocks=2)  # fmt: skip
    kwargs = dict(case.kwargs)
    if case.sinks:
        kwargs["sinks"] = _sinks(case.hq, device)
    if case.holes is not None:
        kwargs["slot_valid"] = p.slot_valid(case.holes)  # and NaN-poisons those slots
    row = {"name": case.name, "dtype": dtype_name(dtype), "tolerance": TOLERANCES[dtype]}
    with kernels.trace_backends() as calls:
        out = p.attend(backend, **kwargs)
    expected = p.attend("float64", **kwargs)
    row["error"] = relative_error(out, expected)
    if calls != [("paged_attention", backend)]:
        row["reason"] = f"ran {calls}, expected {backend}"
    elif out.isnan().any():
        row["reason"] = "NaN in the output (a poisoned slot was read)"
    elif row["error"] > TOLERANCES[dtype]:
        row["reason"] = f"max error {row['error']:.3g} of max |expected| > {TOLERANCES[dtype]}"
    row["ok"] = "reason" not in row
    return row


def check_moves(dtype: torch.dtype, device: torch.device, backend: str) -> list[str]:
    """write_kv, gather_kv (its inverse) and copy_blocks (pool views and separate layers)
    against the reference, exactly; returns what failed."""
    from pagedkv.kernels import reference

    failures = []
    p = make_paged_problem([1, 37, 16], None, 4, 2, 80, 8, dtype, device=device, spare_blocks=2)
    new_key, new_value = torch.randn_like(p.key), torch.randn_like(p.value)
    expected = p.pool.clone()
    reference.write_kv(new_key, new_value, expected[:, 0, 0], expected[:, 0, 1], p.slot_mapping)
    kernels.write_kv(new_key, new_value, p.key_cache, p.value_cache, p.slot_mapping,
                     backend=backend)  # fmt: skip
    if not torch.equal(p.pool.nan_to_num(7.0), expected.nan_to_num(7.0)):
        failures.append(f"write_kv {dtype_name(dtype)}: differs from the reference")
    key, value = kernels.gather_kv(
        p.key_cache, p.value_cache, p.block_tables, p.seq_lens, backend=backend
    )
    if not (torch.equal(key, new_key) and torch.equal(value, new_value)):
        failures.append(f"gather_kv {dtype_name(dtype)}: not the inverse of write_kv")

    layers = 3
    pool = torch.randn(6, layers, 2, 8, 2, 64, device=device).to(dtype)
    separate = [torch.randn(6, 8, 2, 64, device=device).to(dtype) for _ in range(2 * layers)]
    mapping = torch.tensor([[1, 4], [2, 5]], device=device)
    for layout, keys, values in (
        ("pool", [pool[:, i, 0] for i in range(layers)], [pool[:, i, 1] for i in range(layers)]),
        ("separate layers", separate[:layers], separate[layers:]),
    ):
        want_k, want_v = [k.clone() for k in keys], [v.clone() for v in values]
        reference.copy_blocks(want_k, want_v, mapping)
        kernels.copy_blocks(keys, values, mapping, backend=backend)
        pairs = zip(keys + values, want_k + want_v, strict=True)
        if not all(torch.equal(a, b) for a, b in pairs):
            failures.append(f"copy_blocks {dtype_name(dtype)} ({layout}): differs")
    return failures


def check_long_gather(device: torch.device, backend: str) -> list[str]:
    """gather_kv of one 70,000-token context (past CUDA's grid y-limit of 65,535)."""
    p = make_paged_problem([70_000], None, 8, 8, 64, 16, BF16, device=device, spare_blocks=2)
    key, value = kernels.gather_kv(
        p.key_cache, p.value_cache, p.block_tables, p.seq_lens, backend=backend
    )
    if torch.equal(key, p.key) and torch.equal(value, p.value):
        return []
    return ["gather_kv of a 70,000-token context: differs from the keys written"]


def check_cuda_graph(device: torch.device, backend: str) -> list[str]:
    """One decode step's launches captured in a CUDA graph, replayed on new query, key and value
    values (written in place, as a graph's inputs are), against the same launches run eagerly.
    4 sequences x 8 KV heads are fewer programs than SMs, so split-K (and its merge) runs."""
    from pagedkv.kernels.attention import _num_sms, choose_num_splits

    p = make_paged_problem([3000, 1200, 17, 640], None, 32, 8, 128, 16, BF16, device=device,
                           spare_blocks=2)  # fmt: skip
    ends = torch.cumsum(p.seq_lens.long(), 0) - 1
    slots = p.slot_mapping[ends].clone()  # each sequence's last token: the one being decoded
    query = p.query.clone()
    key, value = torch.randn_like(p.key[ends]), torch.randn_like(p.value[ends])
    out = torch.empty_like(query)

    def step():
        kernels.write_kv(key, value, p.key_cache, p.value_cache, slots, backend=backend)
        kernels.paged_attention(query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens,
                                scale=128**-0.5, out=out, backend=backend)  # fmt: skip

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up: every kernel compiled before the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    failures = []
    splits = choose_num_splits(4 * 8, p.block_tables.shape[1] * 16, 64, _num_sms(device))
    for trial in range(2):
        for t in (query, key, value):
            t.copy_(torch.randn_like(t))
        graph.replay()
        replayed = out.clone()
        step()
        if not torch.equal(replayed, out):
            error = relative_error(replayed, out)
            failures.append(f"CUDA graph replay {trial} ({splits} splits): differs from eager "
                            f"(max error {error:.3g} of max |eager|)")  # fmt: skip
    return failures


def run_checks(budget: Budget, out: dict, device: torch.device, backend: str) -> None:
    """Fill `out`: attention rows, passed/failures/skipped (and stop early when the budget
    runs out: the rest are listed as skipped)."""
    on_gpu = device.type == "cuda"
    interpreted = backend == "triton" and not on_gpu
    cases = _gpu_cases() if on_gpu else _cpu_cases()
    out.update(attention=[], failures=[], skipped=[], passed=0)
    for dtype in ALL:
        for case in cases:
            if dtype not in case.dtypes:
                continue
            label = f"{case.name} {dtype_name(dtype)}"
            if interpreted and dtype == BF16:
                out["skipped"].append(f"{label}: the interpreter computes bf16 tl.dot wrongly")
            elif not budget.allows(RESERVE_S):
                out["skipped"].append(f"{label}: out of time")
            else:
                _record(out, label, lambda c=case, t=dtype: _attention(c, t, device, backend, out))
    moves = [
        (f"write/gather/copy {dtype_name(t)}", lambda t=t: check_moves(t, device, backend))
        for t in ALL
    ]
    if on_gpu:
        moves.append(("gather_kv long context", lambda: check_long_gather(device, backend)))
        moves.append(("CUDA graph of a decode step", lambda: check_cuda_graph(device, backend)))
    else:
        out["skipped"].append("CUDA graph of a decode step: needs CUDA")
    for label, check in moves:
        if budget.allows(RESERVE_S):
            _record(out, label, check)
        else:
            out["skipped"].append(f"{label}: out of time")


def _attention(case: Case, dtype, device, backend, out: dict) -> list[str]:
    row = check_attention(case, dtype, device, backend)
    out["attention"].append(row)
    return [] if row["ok"] else [f"{row['name']} {row['dtype']}: {row['reason']}"]


def _record(out: dict, label: str, check) -> None:
    """Run `check()` (returns failure messages); an exception is a failure too."""
    try:
        failures = check()
    except Exception as err:
        failures = [f"{label}: raised {last_line(err)}"]
    out["failures"] += failures
    out["passed"] += not failures
