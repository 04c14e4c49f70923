"""examples/benchmark_kernels.py stays runnable: its CPU path (correctness on the torch backend)
and its timing code on tiny shapes (--smoke), in a subprocess without the interpreter."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).parents[2] / "examples" / "benchmark_kernels.py"


def test_benchmark_script_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PAGEDKV_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a GPU machine
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checks passed" in result.stdout
    data = json.loads(out.read_text())
    assert data["backend"] == "torch" and data["checks_passed"] > 0
    names = [row["name"] for row in data["results"]]
    assert names[0] == "device copy"
    assert sum(name.startswith("decode paged") for name in names) == 3
    assert any(name.startswith("write_kv") for name in names)
    assert any(name.startswith("copy_blocks") for name in names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_cuda_match_reference():
    """On a GPU machine: the compiled kernels (not the interpreter this process uses) against
    the torch reference, through the benchmark's correctness checks."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PAGEDKV_BACKEND")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check-only"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "backend: triton" in result.stdout and "checks passed" in result.stdout
