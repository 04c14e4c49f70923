"""examples/autotune.py: the --interpret sweep writes configs the launchers load back.

The sweep runs in a subprocess whose environment lacks TRITON_INTERPRET, so the script itself
must turn the interpreter on, and so the tuned configs it registers stay out of this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

LOAD_BACK = """
import json, sys, torch
from pagedkv.kernels import (get_tuned_config, load_tuned_configs, paged_attention, reference,
                             triton_interpreted, trace_backends, KernelConfig)
assert triton_interpreted()
path = sys.argv[1]
saved = json.load(open(path))
load_tuned_configs(path)
for op, table in saved.items():
    for key, fields in table.items():
        assert get_tuned_config(op, key) == KernelConfig(**fields), (op, key)
# A launch under the decode key runs (through the tuned config) and matches the reference.
g = torch.Generator().manual_seed(0)
kc, vc = torch.randn(6, 16, 1, 16, generator=g), torch.randn(6, 16, 1, 16, generator=g)
q = torch.randn(2, 2, 16, generator=g)
bt = torch.tensor([[0, 2, 4], [1, 3, 5]], dtype=torch.int32)
lens = torch.tensor([40, 33], dtype=torch.int32)
with trace_backends() as calls:
    got = paged_attention(q, kc, vc, bt, lens, scale=0.25)
assert calls == [("paged_attention", "triton")], calls
want = reference.paged_attention(q, kc, vc, bt, lens, scale=0.25)
torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
print("loaded", sum(len(t) for t in saved.values()))
"""


def _env_without_interpreter() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("PAGEDKV_BACKEND", None)
    return env


def test_interpret_sweep_saves_configs_that_load_back(tmp_path):
    out = tmp_path / "tuned.json"
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "autotune.py"), "--interpret", "-o", str(out)],
        env=_env_without_interpreter(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Triton interpreter on CPU" in run.stdout
    assert "% copy" in run.stdout and "best configs" in run.stdout
    # interpreter timings measure Python: no copy bandwidth or GB/s is claimed for them
    assert "no bandwidth is shown" in run.stdout and "GB/s (read + write" not in run.stdout
    saved = json.loads(out.read_text())
    assert set(saved) == {"paged_attention", "write_kv"}
    assert set(saved["paged_attention"]) == {
        "D16-bs16-float32-decode",
        "D16-bs16-float32-prefill",
    }
    assert set(saved["write_kv"]) == {"D16-bs16-float32"}

    env = {**_env_without_interpreter(), "TRITON_INTERPRET": "1"}
    check = subprocess.run(
        [sys.executable, "-c", LOAD_BACK, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "loaded 3" in check.stdout


def test_without_cuda_exits_with_a_clear_message(load_example, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_example("autotune").main(["--num-heads", "8"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and "--interpret" in err


def test_bad_flag_values_are_named(load_example, capsys):
    with pytest.raises(SystemExit):
        load_example("autotune").main(["--block-size", "24"])
    assert "--block-size: 24 is invalid" in capsys.readouterr().err


@pytest.mark.parametrize("interpret", [False, True], ids=["full", "interpret"])
def test_candidates_come_from_the_launchers_own_space(load_example, interpret):
    """autotune.py sweeps the launchers' candidate spaces: each config it tries is an entry of the
    op's space (as a KernelConfig of the fields it tunes), none other."""
    import importlib

    import torch

    from pagedkv.kernels import KernelConfig

    autotune = load_example("autotune")
    attention = importlib.import_module("pagedkv.kernels.attention")
    write_kv = importlib.import_module("pagedkv.kernels.write_kv")
    attention_space = {
        KernelConfig(block_n=c.kwargs["BLOCK_N"], num_warps=c.num_warps, num_stages=c.num_stages)
        for c in attention._AUTOTUNE_CONFIGS
    }
    write_kv_space = {
        KernelConfig(block_h=c.kwargs["BLOCK_H"], num_warps=c.num_warps)
        for c in write_kv._AUTOTUNE_CONFIGS
    }
    tried = 0
    for heads, kv_heads, head_dim in [
        (32, 8, 128),
        (8, 1, 96),
        (64, 2, 64),
        (4, 4, 256),
        (2, 1, 16),
    ]:
        g = autotune.Geometry(heads, kv_heads, head_dim, "test")
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for mode in ("decode", "prefill", "write_kv"):
                configs = autotune.candidates(mode, g, dtype, interpret)
                space = write_kv_space if mode == "write_kv" else attention_space
                assert configs and all(c in space for c in configs), (mode, g, dtype, configs)
                if interpret:
                    assert len(configs) <= 2
                    assert configs == autotune.candidates(mode, g, dtype, False)[: len(configs)]
                tried += len(configs)
    assert tried > 0
