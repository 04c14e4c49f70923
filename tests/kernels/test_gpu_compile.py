"""Compile every kernel for an H100 (sm_90) without a GPU: the Triton frontend, its GPU passes
and ptxas run on CPU. Catches what the interpreter cannot: constructs the compiler rejects,
shared-memory overflow of the candidate space, register spills, and K/V loops that do not keep a
tile in flight (every in-loop `cp.async.wait_group` must leave a group outstanding).

Runs in a subprocess because this process decorated the kernels for the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r'''
    import importlib
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    H100 = GPUTarget("cuda", 90, 32)
    SHARED_LIMIT = 227 * 1024
    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


    def spill_bytes(kernel):
        """Bytes of register spills ptxas reports for the kernel's PTX on sm_90a."""
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
        os.unlink(f.name)
        return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", out))


    def loop_waits(ptx):
        """The `cp.async.wait_group N` counts inside loops (code between a label and a backward
        branch to it). N > 0: the loop waits for its oldest copy only, later tiles stay in
        flight; N = 0 waits for every copy issued, so loads never overlap compute."""
        lines = ptx.splitlines()
        labels = {}
        for i, line in enumerate(lines):
            label = re.match(r"\s*(\$L__\w+):", line)
            if label:
                labels[label.group(1)] = i
        waits = []
        for i, line in enumerate(lines):
            branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
            if branch and labels.get(branch.group(1), i) < i:
                body = lines[labels[branch.group(1)]:i]
                waits += [int(n) for l in body for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", l)]
        return waits


    def assert_pipelined(kernel, what):
        waits = loop_waits(kernel.asm["ptx"])
        assert waits and min(waits) > 0, (what, "K/V loop waits for every copy", waits)


    def compile_kernel(fn, pointer_types, constexprs, num_warps=4, num_stages=2):
        """Compile like a launch would: unit strides specialised to 1, pointers and other
        strides 16-divisible, lengths plain i32."""
        names = fn.arg_names
        signature, attrs = {}, {}
        for i, name in enumerate(names):
            if name in constexprs:
                signature[name] = "constexpr"
            else:
                signature[name] = pointer_types.get(name, "i32")
                if name.endswith("_ptr") or name.startswith("stride"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                        constexprs={(names.index(k),): v for k, v in constexprs.items()})
        options = {"num_warps": num_warps, "num_stages": num_stages}
        kernel = triton.compile(src, target=H100, options=options)
        assert kernel.metadata.shared <= SHARED_LIMIT, (fn.__name__, constexprs, kernel.metadata.shared)
        return kernel


    attention = importlib.import_module("pagedkv.kernels.attention")
    write_kv = importlib.import_module("pagedkv.kernels.write_kv")
    copy_blocks = importlib.import_module("pagedkv.kernels.copy_blocks")
    gather_kv = importlib.import_module("pagedkv.kernels.gather_kv")

    def attention_types(dtype):
        types = {n: dtype for n in ("query_ptr", "key_cache_ptr", "value_cache_ptr", "out_ptr")}
        types.update({"block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                      "query_start_loc_ptr": "*i32", "slot_valid_ptr": "*u8", "sinks_ptr": "*bf16",
                      "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "scale": "fp32",
                      "softcap": "fp32"})
        return types

    UNIT = {"stride_q_d": 1, "stride_kc_d": 1, "stride_vc_d": 1, "stride_o_d": 1, "stride_bt_n": 1}
    DECODE = {"HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "BLOCK_SIZE": 16, "GROUP": 4, "GROUP_PAD": 4,
              "BLOCK_M": 16, "BLOCK_Q": 4, "BLOCK_N": 64, "SPLIT_K": False, "IS_DECODE": True,
              "CAUSAL": False, "USE_WINDOW": False, "USE_SOFTCAP": False, "USE_SLOT_VALID": False,
              "USE_SINKS": False, "FP32_DOT": False, "WHILE_LOOP": False, **UNIT}
    PREFILL = {**DECODE, "IS_DECODE": False, "CAUSAL": True, "BLOCK_M": 128, "BLOCK_Q": 32}
    variants = [
        ("*bf16", DECODE, 3),
        ("*bf16", {**DECODE, "SPLIT_K": True}, 3),
        ("*fp16", {**DECODE, "HEAD_DIM": 80, "GROUP": 3, "BLOCK_Q": 4, "BLOCK_SIZE": 8}, 3),
        ("*bf16", {**PREFILL, "BLOCK_SIZE": 32}, 3),
        ("*fp16", {**PREFILL, "USE_WINDOW": True, "USE_SOFTCAP": True, "SPLIT_K": True}, 3),
        ("*bf16", {**PREFILL, "CAUSAL": False, "GROUP": 8, "GROUP_PAD": 8, "BLOCK_Q": 16}, 3),
        ("*fp32", {**DECODE, "HEAD_DIM": 256, "HEAD_DIM_PAD": 256, "BLOCK_N": 32,
                   "FP32_DOT": True}, 3),
        ("*bf16", {**PREFILL, "HEAD_DIM": 256, "HEAD_DIM_PAD": 256, "BLOCK_N": 32}, 3),
        # a per-slot validity mask (slot_valid=) with every other switch
        ("*bf16", {**DECODE, "USE_SLOT_VALID": True}, 3),
        ("*fp16", {**PREFILL, "USE_SLOT_VALID": True, "USE_WINDOW": True, "USE_SOFTCAP": True,
                   "SPLIT_K": True}, 3),
        ("*fp32", {**DECODE, "HEAD_DIM": 256, "HEAD_DIM_PAD": 256, "BLOCK_N": 32,
                   "FP32_DOT": True, "USE_SLOT_VALID": True}, 3),
        # attention sinks (sinks=): applied in the kernel, or in the merge with split-K
        ("*bf16", {**DECODE, "USE_SINKS": True}, 3),
        ("*bf16", {**DECODE, "USE_SINKS": True, "USE_WINDOW": True, "SPLIT_K": True}, 3),
        ("*fp16", {**PREFILL, "USE_SINKS": True, "USE_WINDOW": True, "USE_SOFTCAP": True}, 3),
        ("*fp32", {**DECODE, "HEAD_DIM": 256, "HEAD_DIM_PAD": 256, "BLOCK_N": 32,
                   "FP32_DOT": True, "USE_SINKS": True, "USE_WINDOW": True}, 3),
    ]
    for dtype, constexprs, stages in variants:
        warps = 8 if constexprs["BLOCK_M"] >= 128 or constexprs["FP32_DOT"] else 4
        kernel = compile_kernel(attention._paged_attention_kernel, attention_types(dtype),
                                constexprs, num_warps=warps, num_stages=stages)
        assert_pipelined(kernel, (dtype, constexprs))

    # Every candidate config (the space examples/autotune.py sweeps, pruned for the launch) and
    # the shipped default (also with a sliding window, slot_valid= or sinks=), for the main
    # shapes: compiles, keeps K/V tiles in flight, uses no more shared memory than `_fits`
    # counts, does not spill registers.
    D256 = {"HEAD_DIM": 256, "HEAD_DIM_PAD": 256}
    spaces = [
        ("*bf16", DECODE),
        ("*bf16", PREFILL),
        ("*bf16", {**PREFILL, **D256, "BLOCK_M": 64, "BLOCK_Q": 16}),
        ("*fp16", {**PREFILL, "HEAD_DIM": 64, "HEAD_DIM_PAD": 64}),
        ("*fp32", {**DECODE, **D256, "FP32_DOT": True}),
        ("*fp32", {**PREFILL, "BLOCK_M": 16, "BLOCK_Q": 4, "FP32_DOT": True}),
    ]
    tried = 0
    for dtype, base in spaces:
        pruned = attention._prune(attention._AUTOTUNE_CONFIGS, {}, **base)
        default = attention._default_config(
            base["IS_DECODE"], base["HEAD_DIM_PAD"], base["GROUP_PAD"], base["FP32_DOT"]
        )
        assert default.block_m == base["BLOCK_M"], (default, base["BLOCK_M"])
        candidates = [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, {}) for c in pruned]
        for switches in ({}, {"USE_SLOT_VALID": True}, {"USE_WINDOW": True},
                         {"USE_SINKS": True}, {"USE_SINKS": True, "USE_WINDOW": True}):
            candidates.append((default.block_n, default.num_warps, default.num_stages, switches))
        for block_n, num_warps, num_stages, switches in candidates:
            constexprs = {**base, "BLOCK_N": block_n, **switches}
            kernel = compile_kernel(attention._paged_attention_kernel, attention_types(dtype),
                                    constexprs, num_warps, num_stages)
            what = (dtype, constexprs, num_warps, num_stages)
            assert_pipelined(kernel, what)
            estimate = attention._shared_bytes(base["BLOCK_M"], block_n, base["HEAD_DIM_PAD"],
                                               num_stages, base["FP32_DOT"])
            assert kernel.metadata.shared <= estimate, (what, kernel.metadata.shared, estimate)
            spills = spill_bytes(kernel) if os.path.exists(PTXAS) else 0
            assert spills == 0, (dtype, constexprs, num_warps, num_stages, spills)
            tried += 1

    for sinks in (False, True):
        compile_kernel(attention._merge_splits_kernel,
                       {"partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32",
                        "sinks_ptr": "*bf16", "out_ptr": "*bf16"},
                       {"HEAD_DIM": 80, "MAX_SPLITS": attention.MAX_SPLITS, "USE_SINKS": sinks})
    kv = {"key_ptr": "*bf16", "value_ptr": "*bf16", "key_cache_ptr": "*bf16",
          "value_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64"}
    for config in write_kv._AUTOTUNE_CONFIGS:
        compile_kernel(write_kv._write_kv_kernel, kv,
                       {"BLOCK_SIZE": 16, "HEAD_DIM": 96, **config.kwargs},
                       config.num_warps, config.num_stages)
    for table, flat in ((False, True), (True, True), (True, False)):
        compile_kernel(copy_blocks._copy_blocks_kernel,
                       {"key_cache_ptr": "*fp16", "value_cache_ptr": "*fp16",
                        "key_layer_ptrs_ptr": "*i64", "value_layer_ptrs_ptr": "*i64",
                        "block_mapping_ptr": "*i64"},
                       {"HEAD_DIM": 128, "HEADS_PAD": 8,
                        "USE_PTR_TABLE": table, "FLAT": flat, "FLAT_CHUNK": 4096})
    compile_kernel(gather_kv._gather_kv_kernel,
                   {"key_cache_ptr": "*bf16", "value_cache_ptr": "*bf16",
                    "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                    "seq_ends_ptr": "*i64", "key_out_ptr": "*bf16", "value_out_ptr": "*bf16"},
                   {"BLOCK_SIZE": 16, "HEAD_DIM": 128, "HEADS_PAD": 8,
                    "BLOCK_P": gather_kv.block_positions(8, 128)})
    print("compiled", len(variants) + tried, "attention variants")
    '''
)


def test_kernels_compile_for_h100():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    if "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("ptxas not available")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
