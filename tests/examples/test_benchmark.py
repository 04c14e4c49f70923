"""examples/benchmark.py --quick: every section runs, the JSON has the ratios, the PNG exists."""

from __future__ import annotations

import json


def test_benchmark_quick_writes_ratios(load_example, torch_kernels, tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = load_example("benchmark").main(["--quick", "--json", str(out_json), "--png", str(out_png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    results = json.loads(out_json.read_text())
    for name in ("decode", "beams", "prefix"):
        r = results[name]
        assert r["tokens_match"], f"{name}: paged tokens differ from stock"
        assert r["time_ratio"] > 0 and r["stock_s"] > 0 and r["paged_s"] > 0
        assert set(r["meets"]) == set(r["goals"])
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
    assert results["manager"]["us_per_step"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "paged/stock" in printed and ("meets" in printed or "MISSES" in printed)
