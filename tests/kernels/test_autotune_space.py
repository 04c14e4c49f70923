"""`candidate_configs`: the launchers' candidate spaces (what examples/autotune.py sweeps), pruned
for a launch, and each config runs as itself once set as the tuned config. Launchers themselves
never autotune: they run a tuned config or the shipped default."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from pagedkv import kernels
from pagedkv.kernels import config_key, paged_attention, write_kv

attention_module = importlib.import_module("pagedkv.kernels.attention")
write_kv_module = importlib.import_module("pagedkv.kernels.write_kv")
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


@pytest.fixture
def _clean_tuned():
    kernels.clear_tuned_configs()
    yield
    kernels.clear_tuned_configs()


class _AutotuneSpy:
    """Stands in for a launcher's `triton.autotune` kernel: prunes the real space with the real
    prune for each launch (as autotune would), records the survivors, launches nothing."""

    def __init__(self, tuned):
        self.tuned, self.pruned = tuned, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            nargs = dict(zip(self.tuned.arg_names, args))
            pruned = self.tuned.early_config_prune(self.tuned.configs, nargs, **meta)
            self.pruned.append(pruned)
            self.best_config = pruned[0]

        return launch


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's meta-parameters, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def _as_compiled(monkeypatch, module):
    """Make `module`'s launcher take its compiled-GPU path for CPU tensors."""
    fake = types.SimpleNamespace(
        resolve_backend=lambda backend, device: "triton",
        record=lambda op, backend: None,
        triton_interpreted=lambda: False,
    )
    monkeypatch.setattr(module, "_dispatch", fake)


ATTENTION_CASES = [
    # seq_lens, q_lens, Hq, Hkv, D, dtype
    pytest.param([40, 9], None, 8, 2, 128, BF16, id="decode-D128-gqa4-bf16"),
    pytest.param([40, 9], [5, 9], 8, 2, 128, F16, id="prefill-D128-gqa4-fp16"),
    pytest.param([30], [30], 4, 4, 64, F16, id="prefill-D64-fp16"),
    pytest.param([20, 3], None, 4, 2, 80, F32, id="decode-D80-fp32"),
    pytest.param([20], [7], 64, 2, 64, F32, id="prefill-fp32-gqa32-nothing-fits"),
    pytest.param([33], None, 2, 1, 256, BF16, id="decode-D256-bf16"),
]


class _RecordSpy:
    """Stands in for a @triton.jit kernel on the compiled path: records each launch's grid,
    runtime arguments and meta-parameters, launches nothing."""

    def __init__(self, kernel):
        self.arg_names, self.launches = kernel.arg_names, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append({"grid": grid, "args": dict(zip(self.arg_names, args)), **meta})

        return launch


def _attend(problem, **kwargs):
    return paged_attention(
        problem.query, problem.key_cache, problem.value_cache, problem.block_tables,
        problem.seq_lens, scale=0.125, query_start_loc=problem.query_start_loc, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("seq_lens, q_lens, hq, hkv, d, dtype", ATTENTION_CASES)
def test_compiled_launch_runs_the_shipped_default_not_autotune(
    make_paged, monkeypatch, _clean_tuned, seq_lens, q_lens, hq, hkv, d, dtype
):
    """Nothing autotunes on the serving path: with no tuned config the compiled launch runs the
    default config, one of the candidates (the pruned space) when any fits, and no pipelined
    loop of the default runs on fewer than 3 stages (2 never keep a K/V tile in flight)."""
    problem = make_paged(seq_lens, q_lens, hq, hkv, d, 16, dtype, poison=False)
    spy = _RecordSpy(attention_module._paged_attention_kernel)
    monkeypatch.setattr(attention_module, "_paged_attention_kernel", spy)
    _as_compiled(monkeypatch, attention_module)
    assert not hasattr(attention_module, "_paged_attention_kernel_tuned")
    _attend(problem)
    (launch,) = spy.launches
    mode = "decode" if q_lens is None else "prefill"
    default = attention_module._default_config(
        q_lens is None, launch["HEAD_DIM_PAD"], launch["GROUP_PAD"], dtype == F32
    )
    assert (launch["BLOCK_N"], launch["num_warps"], launch["num_stages"]) == (
        default.block_n, default.num_warps, default.num_stages,
    )  # fmt: skip
    assert launch["num_stages"] >= 3
    got = attention_module.candidate_configs(head_dim=d, group=hq // hkv, dtype=dtype, mode=mode)
    meta = {"HEAD_DIM_PAD": launch["HEAD_DIM_PAD"], "BLOCK_M": launch["BLOCK_M"],
            "FP32_DOT": dtype == F32}  # fmt: skip
    pruned = attention_module._prune(attention_module._AUTOTUNE_CONFIGS, meta)
    assert [(c.block_n, c.num_warps, c.num_stages) for c in got] == [
        (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in pruned
    ]
    assert all(c.num_stages >= 3 for c in got)
    assert all(set(c.to_dict()) == {"block_n", "num_warps", "num_stages"} for c in got)


def test_split_count_is_a_runtime_argument(make_paged, monkeypatch, _clean_tuned):
    """Every split count > 1 launches the same compiled kernel (same meta-parameters, the count
    is an argument), so a new count mid-generation compiles nothing; the merge likewise."""
    problem = make_paged([300, 9], None, 8, 2, 64, 16, F16, poison=False)
    spy = _RecordSpy(attention_module._paged_attention_kernel)
    merge = _RecordSpy(attention_module._merge_splits_kernel)
    monkeypatch.setattr(attention_module, "_paged_attention_kernel", spy)
    monkeypatch.setattr(attention_module, "_merge_splits_kernel", merge)
    _as_compiled(monkeypatch, attention_module)
    for splits in (2, 5, 17):
        _attend(problem, config={"num_splits": splits})
    metas = [{k: v for k, v in launch.items() if k not in ("grid", "args")} for launch in spy.launches]
    assert metas[0] == metas[1] == metas[2] and metas[0]["SPLIT_K"]
    assert [launch["args"]["num_splits"] for launch in spy.launches] == [2, 5, 17]
    assert [launch["grid"][2] for launch in spy.launches] == [2, 5, 17]
    merge_metas = [{k: v for k, v in m.items() if k not in ("grid", "args")} for m in merge.launches]
    assert merge_metas[0] == merge_metas[1] == merge_metas[2]
    with pytest.raises(ValueError, match="num_splits must be at most 64, got 65"):
        _attend(problem, config={"num_splits": 65})


def test_attention_candidate_runs_as_itself_when_tuned(make_paged, monkeypatch, _clean_tuned):
    """A saved candidate makes the launcher run exactly it (block_m as under autotune)."""
    problem = make_paged([40, 9], None, 8, 2, 64, 8, F16)
    spy = _LaunchSpy(attention_module._paged_attention_kernel)
    monkeypatch.setattr(attention_module, "_paged_attention_kernel", spy)
    args = (problem.query, problem.key_cache, problem.value_cache, problem.block_tables)
    key = config_key(head_dim=64, block_size=8, dtype=F16, mode="decode")
    candidates = attention_module.candidate_configs(head_dim=64, group=4, dtype=F16, mode="decode")
    default_block_m = attention_module._default_config(True, 64, 4, False).block_m
    for config in candidates[:3]:
        kernels.set_tuned_config("paged_attention", key, config)
        paged_attention(*args, problem.seq_lens, scale=0.125)
        launched = spy.launches[-1]
        assert (launched["BLOCK_N"], launched["num_warps"], launched["num_stages"]) == (
            config.block_n,
            config.num_warps,
            config.num_stages,
        )
        assert launched["BLOCK_M"] == default_block_m


@pytest.mark.parametrize("hkv", [1, 3, 8, 32])
def test_write_kv_candidates_are_the_pruned_space(hkv):
    got = write_kv_module.candidate_configs(num_kv_heads=hkv)
    space = [(c.kwargs["BLOCK_H"], c.num_warps) for c in write_kv_module._AUTOTUNE_CONFIGS]
    heads_pad = 1 << (hkv - 1).bit_length()
    assert [(c.block_h, c.num_warps) for c in got] == [
        (block_h, warps) for block_h, warps in space if block_h <= heads_pad
    ]
    assert all(set(c.to_dict()) == {"block_h", "num_warps"} for c in got)


def test_write_kv_never_autotunes(monkeypatch, _clean_tuned):
    """Without a config or a tuned one, the compiled-GPU path launches the kernel once with the
    shipped default: no autotune (no stall on the first call, nothing CUDA graphs cannot
    capture)."""
    assert not hasattr(write_kv_module, "_write_kv_kernel_tuned")
    spy = _LaunchSpy(write_kv_module._write_kv_kernel)
    monkeypatch.setattr(write_kv_module, "_write_kv_kernel", spy)
    _as_compiled(monkeypatch, write_kv_module)
    cache = torch.zeros(4, 8, 3, 64, dtype=F16)
    key = torch.randn(3, 3, 64).to(F16)
    write_kv(key, key, cache, cache, torch.tensor([0, 9, 17]))
    default = write_kv_module._default_config(3, 64)
    (launched,) = spy.launches
    assert (launched["BLOCK_H"], launched["num_warps"]) == (default.block_h, default.num_warps)
    assert torch.equal(cache.flatten(0, 1)[[0, 9, 17]], key)


def test_write_kv_candidate_runs_as_itself_when_tuned(monkeypatch, _clean_tuned):
    spy = _LaunchSpy(write_kv_module._write_kv_kernel)
    monkeypatch.setattr(write_kv_module, "_write_kv_kernel", spy)
    cache = torch.zeros(4, 8, 4, 64, dtype=F16)
    key = torch.randn(3, 4, 64).to(F16)
    tuned_key = config_key(head_dim=64, block_size=8, dtype=F16)
    stages = {c.num_stages for c in write_kv_module._AUTOTUNE_CONFIGS}
    for config in write_kv_module.candidate_configs(num_kv_heads=4):
        kernels.set_tuned_config("write_kv", tuned_key, config)
        write_kv(key, key, cache, cache, torch.tensor([0, 9, 17]))
        launched = spy.launches[-1]
        assert (launched["BLOCK_H"], launched["num_warps"]) == (config.block_h, config.num_warps)
        assert {launched["num_stages"]} == stages


def test_candidate_configs_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be 'decode' or 'prefill', got 'append'"):
        attention_module.candidate_configs(head_dim=64, group=1, dtype=F16, mode="append")
