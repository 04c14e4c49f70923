"""examples/benchmark_kernels.py (the GPU check) stays runnable: its smoke mode runs every
section end to end on CPU (tiny shapes, the torch reference, tiny random models) in a
subprocess without the interpreter, and writes the JSON and the markdown report; a section
that raises or runs past its time is recorded and the run goes on."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).parents[2] / "examples"
SCRIPT = EXAMPLES / "benchmark_kernels.py"
SECTIONS = ["checks", "kernels", "generate", "batching"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PAGEDKV_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a GPU machine
    env["OMP_NUM_THREADS"] = "1"  # a shared 2-core machine
    return env


def test_smoke_runs_every_section(tmp_path):
    out, report = tmp_path / "gpu.json", tmp_path / "gpu.md"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out), "--markdown", str(report)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] and data["device"] == "cpu" and data["backend"] == "torch"
    assert set(data["versions"]) >= {"torch", "triton", "transformers"}
    assert list(data["sections"]) == SECTIONS
    assert all(data["sections"][s]["status"] == "ok" for s in SECTIONS), data["problems"]
    assert data["problems"] == []
    sections = {s: data["sections"][s]["result"] for s in SECTIONS}

    checks = sections["checks"]
    assert checks["passed"] > 0 and not checks["failures"]
    assert {row["dtype"] for row in checks["attention"]} == {"bfloat16", "float16", "float32"}

    rows = sections["kernels"]["rows"]
    assert rows[0]["op"] == "device copy"
    decode = [r for r in rows if r["op"] == "decode"]
    assert len(decode) == 3 * 3  # 3 shapes x (SDPA, production pool, one-layer pool)
    assert {r["layout"] for r in decode} == {"SDPA contiguous", "pool 4 layers", "pool 1 layer"}
    assert all("fraction_of_copy" in r and "ms_p20" in r for r in rows)
    assert {r["op"] for r in rows} >= {"prefill", "write_kv", "copy_blocks"}

    cases = sections["generate"]["cases"]
    assert list(cases) == ["decode", "beams", "prefix"]
    for name, case in cases.items():
        assert case["stock_tokens_per_s"] > 0 and case["paged_kv_bytes"] > 0, name
        assert case["tokens"]["rows_differ"] == 0, (name, case["tokens"])  # float32 on CPU
    assert cases["prefix"]["prefix_hits"] > 0

    batching = sections["batching"]
    assert set(batching["tokens_per_s"]) == {"static", "transformers", "paged"}
    assert batching["paged_differ_from_static"] == []

    text = report.read_text()
    assert text.startswith("### cpu: GPU check") and "SMOKE RUN" in text
    for heading in ("**Correctness**", "**Kernels**", "**generate**", "**Continuous batching**"):
        assert heading in text
    assert "| decode | 64x1024" not in text and "| decode | 4x16 | pool 4 layers |" in text
    assert text in result.stdout  # printed too
    assert seconds < 120, f"the smoke run took {seconds:.0f} s"


@pytest.fixture
def budget_module(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import _gpu_budget

    return _gpu_budget


def test_a_section_that_raises_is_recorded(budget_module):
    def section(budget, out):
        out["done"] = 1
        raise RuntimeError("kernel exploded")

    record = budget_module.run_section("x", section, 10)
    assert record["status"] == "error"
    assert record["error"] == "RuntimeError: kernel exploded"
    assert record["result"] == {"done": 1}  # what it finished before the error


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="needs SIGALRM")
def test_a_section_past_its_hard_limit_is_stopped(budget_module):
    def section(budget, out):
        out["started"] = True
        time.sleep(30)

    start = time.perf_counter()
    record = budget_module.run_section("slow", section, 0.2)
    assert time.perf_counter() - start < 5
    assert record["status"] == "error" and "SectionTimeout" in record["error"]
    assert record["result"] == {"started": True}


def test_time_left_goes_to_the_sections_after(budget_module):
    weights = {"a": 1.0, "b": 3.0}
    assert budget_module.split_budget(100, weights, "a") == 25
    assert budget_module.split_budget(90, {"b": 3.0}, "b") == 90


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_cuda_match_reference():
    """On a GPU machine: the compiled kernels (not the interpreter this process uses) against
    the torch reference, through the script's correctness checks."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PAGEDKV_BACKEND")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check-only"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "backend: triton" in result.stdout and "checks passed" in result.stdout
