"""examples/generate.py: the README's main job, in its CPU mode (random Llama, torch kernels)."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(
            ["--batch-size", "3", "--max-new-tokens", "6", "--block-size", "8"], id="greedy-B3-bs8"
        ),
        pytest.param(
            ["--batch-size", "2", "--max-new-tokens", "5", "--num-beams", "3"], id="beams3-B2"
        ),
    ],
)
def test_generate_matches_stock(load_example, torch_kernels, capsys, argv):
    rc = load_example("generate").main([*argv, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "random Llama built from a config" in out
    assert "turn 1: paged tokens == stock tokens" in out
    assert "turn 2: paged tokens == stock tokens" in out
    hits, queries = map(int, re.search(r"prefix cache: (\d+) of (\d+) prompt tokens", out).groups())
    assert 0 < hits < queries, "turn 2 must reuse turn 1's blocks"
    mem = re.search(r"turn 1 KV memory .*? ([\d.]+)x", out)
    assert mem and 0 < float(mem.group(1)) < 1.0, "paged KV must be smaller than stock's"
    assert re.search(r"turn 1 tokens/s\s+[\d.]+\s+[\d.]+", out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size: 0 is invalid"),
        (["--block-size", "12"], "--block-size: 12 is invalid; expected a power of two"),
        (["--max-new-tokens", "many"], "--max-new-tokens: 'many' is not an integer"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--device", "tpu"], "'tpu' is not a torch device"),
    ],
)
def test_bad_flag_values_are_named(load_example, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        load_example("generate").main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
