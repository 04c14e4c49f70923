"""examples/benchmark_kernels.py on CPU says what it compared, and --save-configs writes nothing
(and says why) when nothing was autotuned."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the script")


def test_cpu_run_says_the_backend_is_the_reference(load_example, torch_kernels, capsys, tmp_path):
    path = tmp_path / "tuned.json"
    rc = load_example("benchmark_kernels").main(["--check-only", "--save-configs", str(path)])
    captured = capsys.readouterr()
    assert "checks passed, but the backend here is the torch reference itself" in captured.out
    assert "checks this script, not the Triton kernels" in captured.out
    assert rc == 1, "asked for a configs file it could not write"
    assert not path.exists()
    assert f"nothing written to {path}: no kernel was autotuned in this run" in captured.err
    assert not list(tmp_path.iterdir()), "no temporary file left behind"
