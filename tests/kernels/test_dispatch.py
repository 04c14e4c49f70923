"""Backend dispatch, the trace that proves which backend ran, and launch configs."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from pagedkv import kernels
from pagedkv.kernels import (
    KernelConfig,
    config_key,
    copy_blocks,
    gather_kv,
    paged_attention,
    resolve_backend,
    trace_backends,
    write_kv,
)

attention_module = importlib.import_module("pagedkv.kernels.attention")
dispatch_module = importlib.import_module("pagedkv.kernels._dispatch")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("PAGEDKV_BACKEND", raising=False)


@pytest.fixture
def _clean_tuned():
    kernels.clear_tuned_configs()
    yield
    kernels.clear_tuned_configs()


def run_all_ops(problem, **kwargs):
    write_kv(
        problem.key,
        problem.value,
        problem.key_cache,
        problem.value_cache,
        problem.slot_mapping,
        **kwargs,
    )
    out = paged_attention(
        problem.query,
        problem.key_cache,
        problem.value_cache,
        problem.block_tables,
        problem.seq_lens,
        scale=0.125,
        **kwargs,
    )
    copy_blocks([problem.key_cache], [problem.value_cache], torch.tensor([[1, 1]]), **kwargs)
    key, _ = gather_kv(
        problem.key_cache, problem.value_cache, problem.block_tables, problem.seq_lens, **kwargs
    )
    return out, key


OPS = ["write_kv", "paged_attention", "copy_blocks", "gather_kv"]


def test_interpreter_default_runs_triton(make_paged):
    assert kernels.triton_interpreted()
    problem = make_paged([5, 12], None, 4, 2, 64, 8, torch.float32)
    with trace_backends() as calls:
        run_all_ops(problem)
    assert calls == [(op, "triton") for op in OPS]


def test_backend_argument_and_env(make_paged, monkeypatch):
    problem = make_paged([5, 12], None, 4, 2, 64, 8, torch.float32)
    monkeypatch.setenv("PAGEDKV_BACKEND", "torch")
    with trace_backends() as calls:
        out_torch, key_torch = run_all_ops(problem)
    assert calls == [(op, "torch") for op in OPS]
    with trace_backends() as calls:  # the argument beats the environment
        out_triton, key_triton = run_all_ops(problem, backend="triton")
    assert calls == [(op, "triton") for op in OPS]
    torch.testing.assert_close(out_triton, out_torch, atol=1e-5, rtol=1e-5)
    assert torch.equal(key_triton, key_torch)


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown kernels backend backend='cuda'.*'triton'"):
        resolve_backend("cuda", CPU)
    monkeypatch.setenv("PAGEDKV_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="PAGEDKV_BACKEND='tritonn'"):
        resolve_backend(None, CPU)


def test_default_without_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch_module, "triton_interpreted", lambda: False)
    assert resolve_backend(None, CPU) == "torch"
    assert resolve_backend(None, torch.device("cuda")) == "triton"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", CPU)


def test_trace_nests_and_is_empty_outside(make_paged):
    problem = make_paged([3], None, 2, 2, 64, 8, torch.float32)
    with trace_backends() as outer:
        gather_kv(problem.key_cache, problem.value_cache, problem.block_tables, problem.seq_lens)
        with trace_backends() as inner:
            gather_kv(
                problem.key_cache,
                problem.value_cache,
                problem.block_tables,
                problem.seq_lens,
                backend="torch",
            )
        gather_kv(problem.key_cache, problem.value_cache, problem.block_tables, problem.seq_lens)
    assert inner == [("gather_kv", "torch")]
    assert outer == [("gather_kv", "triton"), ("gather_kv", "triton")]


def test_kernel_config_validation():
    assert KernelConfig.coerce({"block_n": 32}) == KernelConfig(block_n=32)
    assert KernelConfig.coerce(None) is None
    with pytest.raises(ValueError, match="block_n must be a power of 2, got 48"):
        KernelConfig(block_n=48)
    with pytest.raises(ValueError, match="num_splits must be a positive int, got 0"):
        KernelConfig(num_splits=0)
    with pytest.raises(ValueError, match=r"unknown KernelConfig fields \['blockn'\]"):
        KernelConfig.coerce({"blockn": 32})
    with pytest.raises(ValueError, match="config must be a KernelConfig"):
        KernelConfig.coerce(32)


def test_config_key():
    key = config_key(head_dim=128, block_size=16, dtype=torch.bfloat16, mode="decode")
    assert key == "D128-bs16-bfloat16-decode"
    assert config_key(head_dim=64, block_size=8, dtype=torch.float16) == "D64-bs8-float16"


def test_tuned_configs_round_trip(tmp_path, _clean_tuned):
    kernels.set_tuned_config("paged_attention", "D64-bs8-float32-decode", {"block_n": 64})
    kernels.set_tuned_config("paged_attention", "D80-bs8-float32-decode", {"num_warps": 8})
    kernels.set_tuned_config("paged_attention", "D64-bs8-float32-decode", {"block_n": 16})
    kernels.set_tuned_config("write_kv", "D64-bs8-float32", KernelConfig(block_h=2, num_warps=2))
    path = tmp_path / "tuned.json"
    kernels.save_tuned_configs(path)
    data = json.loads(path.read_text())
    assert data == {
        "paged_attention": {
            "D64-bs8-float32-decode": {"block_n": 16},
            "D80-bs8-float32-decode": {"num_warps": 8},
        },
        "write_kv": {"D64-bs8-float32": {"block_h": 2, "num_warps": 2}},
    }
    kernels.clear_tuned_configs()
    assert kernels.get_tuned_config("write_kv", "D64-bs8-float32") is None
    kernels.load_tuned_configs(path)
    assert kernels.get_tuned_config("write_kv", "D64-bs8-float32") == KernelConfig(
        block_h=2, num_warps=2
    )
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        kernels.load_tuned_configs(path)


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's meta-parameters, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({"grid": grid, **kwargs})
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_launcher_uses_loaded_config_by_key(make_paged, monkeypatch, _clean_tuned):
    spy = _LaunchSpy(attention_module._paged_attention_kernel)
    monkeypatch.setattr(attention_module, "_paged_attention_kernel", spy)
    problem = make_paged([40, 9], None, 4, 2, 64, 8, torch.float32)
    args = (
        problem.query,
        problem.key_cache,
        problem.value_cache,
        problem.block_tables,
        problem.seq_lens,
    )
    expected = paged_attention(*args, scale=0.125, backend="torch")

    paged_attention(*args, scale=0.125)  # interpreter default config
    key = config_key(head_dim=64, block_size=8, dtype=torch.float32, mode="decode")
    kernels.set_tuned_config("paged_attention", key, {"block_n": 16, "num_splits": 3})
    out = paged_attention(*args, scale=0.125)
    explicit = paged_attention(*args, scale=0.125, config=KernelConfig(block_n=32, num_splits=2))

    default, tuned, forced = spy.launches
    assert not default["SPLIT_K"] and default["grid"] == (2, 2, 1)
    assert default["BLOCK_N"] == 32  # fp32 default tile
    assert tuned["SPLIT_K"] and tuned["BLOCK_N"] == 16 and tuned["grid"] == (2, 2, 3)
    assert forced["grid"] == (2, 2, 2) and forced["BLOCK_N"] == 32  # explicit beats tuned
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "num_programs, max_context, block_n, num_sms, expected",
    [
        pytest.param(512, 1024, 64, 132, 1, id="64x1k-enough-programs"),
        pytest.param(128, 4096, 64, 132, 3, id="16x4k"),
        pytest.param(8, 8192, 64, 132, 32, id="1x8k-capped-by-tiles"),
        pytest.param(8, 200_000, 64, 132, 33, id="1x200k"),
        pytest.param(1, 10**7, 64, 132, 64, id="cap-64"),
        pytest.param(8, 64, 64, 132, 1, id="short-context"),
    ],
)
def test_choose_num_splits(num_programs, max_context, block_n, num_sms, expected):
    got = attention_module.choose_num_splits(num_programs, max_context, block_n, num_sms)
    assert got == expected


NO_TRITON_SCRIPT = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as on macOS / Windows
import torch
from pagedkv import kernels
assert not kernels.triton_interpreted()
assert kernels.resolve_backend(None, torch.device("cpu")) == "torch"
assert kernels.resolve_backend(None, torch.device("cuda")) == "torch"
try:
    kernels.resolve_backend("triton", torch.device("cpu"))
except ValueError as e:
    assert "Triton is not installed" in str(e), e
else:
    raise AssertionError("backend='triton' without Triton must fail")
cache = torch.zeros(4, 8, 2, 64)
key = torch.randn(3, 2, 64)
with kernels.trace_backends() as calls:
    kernels.write_kv(key, key, cache, cache, torch.tensor([0, 9, 17]))
    out = kernels.paged_attention(torch.randn(1, 4, 64), cache, cache,
                                  torch.tensor([[0, 1, 2]], dtype=torch.int32),
                                  torch.tensor([18], dtype=torch.int32), scale=0.125)
    kernels.copy_blocks([cache], [cache], torch.tensor([[0, 3]]))
    k, _ = kernels.gather_kv(cache, cache, torch.tensor([[0, 1, 2]], dtype=torch.int32),
                             torch.tensor([18], dtype=torch.int32))
assert [b for _, b in calls] == ["torch"] * 4, calls
assert torch.equal(k[[0, 9, 17]], key) and not out.isnan().any()
print("ok")
"""


def test_imports_and_runs_without_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PAGEDKV_BACKEND")}
    result = subprocess.run(
        [sys.executable, "-c", NO_TRITON_SCRIPT], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
