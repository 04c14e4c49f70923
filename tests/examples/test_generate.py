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


def _save_tiny_text_model(path) -> None:
    """A random Llama + a character-level tokenizer, saved like a hub checkpoint."""
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


def test_generate_with_model_path_prints_text(load_example, torch_kernels, capsys, tmp_path):
    pytest.importorskip("tokenizers")
    _save_tiny_text_model(tmp_path)
    rc = load_example("generate").main(
        ["--model", str(tmp_path), "--batch-size", "2", "--max-new-tokens", "5", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"model:   {tmp_path}" in out
    assert "[0] 'The capital of France is' -> '" in out  # decoded text, not token ids
    assert "turn 1: paged tokens == stock tokens" in out
    assert "turn 2: paged tokens == stock tokens" in out
