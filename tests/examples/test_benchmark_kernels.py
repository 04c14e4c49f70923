"""examples/benchmark_kernels.py on CPU says what its checks compared."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the script")


def test_cpu_run_says_the_backend_is_the_reference(load_example, torch_kernels, capsys, tmp_path):
    rc = load_example("benchmark_kernels").main(["--check-only"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert "checks passed, but the backend here is the torch reference itself" in captured.out
    assert "checks this script, not the Triton kernels" in captured.out
