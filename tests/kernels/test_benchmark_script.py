"""examples/benchmark_kernels.py stays runnable: its CPU path (correctness on the torch backend)
and its timing code on tiny shapes (--smoke), in a subprocess without the interpreter."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

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
