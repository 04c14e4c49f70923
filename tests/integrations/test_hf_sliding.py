"""Sliding-window and attention-sink families on long prompts: stock's tokens, and only the
window held.

The families of `test_hf_families.py` run there on short prompts, which a sliding KV cache
group stores whole (a step of at most CROP_STEP tokens keeps its first query's window). Here
prompts run past CROP_STEP, so the group keeps only each prompt's last window, its prompt
attention goes through the window scratch (`kvcache/window.py`) and decoding releases blocks
as they slide out. Every generate mode gives stock's tokens; the sliding groups hold at most
a window's blocks per row; a second call finds the first one's conversation in the prefix
cache.
"""

from __future__ import annotations

import pytest
import torch

from pagedkv.integrations import disable_paged_attention, enable_paged_attention
from pagedkv.kvcache.config import CROP_STEP

SLIDING = ["mistral", "gemma2", "gemma3", "cohere2", "gpt_oss", "qwen2"]
WINDOW = 8  # the families' sliding_window (conftest)
LONG = [CROP_STEP + 20, CROP_STEP + 7]  # prompt lengths of a left-padded batch


sliding_families = pytest.mark.parametrize("family", SLIDING)


def window_bound(manager, rows: int) -> None:
    """Each sliding group held at most a window's blocks per row (one it straddles included)."""
    bs = manager.config.block_size
    for group, stats in zip(manager.config.groups, manager.stats.groups, strict=True):
        if group.window is not None:
            assert stats.peak_used_blocks <= rows * (-(-group.window // bs) + 1), (
                f"window {group.window}: peak {stats.peak_used_blocks} blocks for {rows} rows"
            )


@sliding_families
def test_greedy_long_prompts(family, model, stock_vs_paged, same_generation, helpers):
    ids, mask = helpers.padded_batch(LONG, seed=11)
    inputs = {"input_ids": ids, "attention_mask": mask}
    stock, paged, manager = stock_vs_paged(model, inputs, max_new_tokens=12, do_sample=False)
    same_generation(stock, paged)
    window_bound(manager, rows=2)
    assert manager.num_used_blocks == 0


@sliding_families
def test_beams_and_samples_long_prompts(family, model, stock_vs_paged, same_generation, helpers):
    ids, mask = helpers.padded_batch(LONG, seed=12)
    inputs = {"input_ids": ids, "attention_mask": mask}
    stock, paged, manager = stock_vs_paged(
        model, inputs, max_new_tokens=7, num_beams=3, num_return_sequences=2, do_sample=False
    )
    same_generation(stock, paged)
    window_bound(manager, rows=6)
    stock, paged, _ = stock_vs_paged(
        model, inputs, seed=5, max_new_tokens=7, do_sample=True, num_return_sequences=3
    )
    same_generation(stock, paged)


@sliding_families
def test_prompt_lookup_and_assisted_long_prompts(
    family, model, stock_vs_paged, same_generation, helpers
):
    pattern = [5, 17, 33, 8, 41, 12, 9, 22, 30]
    ids = torch.tensor([(pattern * 10)[: CROP_STEP + 11]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    stock, paged, _ = stock_vs_paged(
        model, inputs, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4
    )
    same_generation(stock, paged)
    assistant = helpers.build_model(family, seed=1)
    ids, mask = helpers.padded_batch([CROP_STEP + 9], seed=13)
    inputs = {"input_ids": ids, "attention_mask": mask}
    stock, paged, _ = stock_vs_paged(
        model, inputs, max_new_tokens=10, do_sample=False, assistant_model=assistant
    )
    same_generation(stock, paged)


@sliding_families
def test_a_second_turn_finds_the_first_in_the_prefix_cache(family, model, helpers):
    ids, mask = helpers.padded_batch([CROP_STEP + 13], seed=14)
    kwargs = dict(max_new_tokens=9, do_sample=False, pad_token_id=helpers.pad)
    with torch.no_grad():
        first_stock = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        turn2 = torch.cat([first_stock, torch.tensor([[7, 8, 9]])], dim=1)
        second_stock = model.generate(
            input_ids=turn2, attention_mask=torch.ones_like(turn2), **kwargs
        )
    manager = enable_paged_attention(model, block_size=helpers.block_size)
    try:
        with torch.no_grad():
            first = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            hits = manager.stats.prefix_hits
            second = model.generate(
                input_ids=turn2, attention_mask=torch.ones_like(turn2), **kwargs
            )
    finally:
        disable_paged_attention(model)
    assert torch.equal(first, first_stock) and torch.equal(second, second_stock)
    # The first call's prompt and answer (all but the last token's K/V) are found, up to the
    # last full block: the sliding groups kept the window those blocks end with.
    stored = first_stock.shape[1] - 1
    found = manager.stats.prefix_hits - hits
    assert found == stored // helpers.block_size * helpers.block_size, found


def test_sinks_change_the_result_and_match_stock(stock_vs_paged, same_generation, helpers):
    """gpt-oss's per-head sink logits (`s_aux`) join the softmax: large ones change what the
    model generates, and pagedkv follows."""
    model = helpers.build_model("gpt_oss", seed=3)
    ids, mask = helpers.padded_batch([CROP_STEP + 5, 12], seed=15)
    inputs = {"input_ids": ids, "attention_mask": mask}
    baseline = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-2.0, 4.0, layer.self_attn.sinks.numel()))
    stock, paged, _ = stock_vs_paged(model, inputs, max_new_tokens=10, do_sample=False)
    same_generation(stock, paged)
    assert not torch.equal(stock.sequences, baseline)


def test_a_paged_assistant_crops_across_its_steps(helpers):
    """The assistant drafts candidates one decode step at a time, and its cache is cropped
    back over several of them: both caches keep what such crops need."""
    model = helpers.build_model("gemma3")
    assistant = helpers.build_model("gemma3", seed=1)
    ids, mask = helpers.padded_batch([CROP_STEP + 10], seed=16)
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=14,
        do_sample=False,
        pad_token_id=helpers.pad,
        assistant_model=assistant,
    )
    with torch.no_grad():
        stock = model.generate(**kwargs)
    enable_paged_attention(model, block_size=helpers.block_size)
    enable_paged_attention(assistant, block_size=helpers.block_size)
    try:
        with torch.no_grad():
            paged = model.generate(**kwargs)
    finally:
        disable_paged_attention(model)
        disable_paged_attention(assistant)
    assert torch.equal(stock, paged)


def test_triton_kernels_serve_sliding_windows_and_sinks(helpers, monkeypatch):
    """The Triton kernels (interpreted) on gpt-oss: a long prompt through the window scratch,
    then decode steps over tables whose released entries are -1."""
    from pagedkv.kernels import trace_backends, triton_interpreted

    if not triton_interpreted():
        pytest.skip("the Triton kernels were not decorated under TRITON_INTERPRET=1")
    model = helpers.build_model("gpt_oss", seed=2)
    ids, mask = helpers.padded_batch([CROP_STEP + 6, 9], seed=17)
    kwargs = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        stock = model.generate(**kwargs)
    monkeypatch.setenv("PAGEDKV_BACKEND", "triton")
    manager = enable_paged_attention(model, block_size=helpers.block_size)
    try:
        with torch.no_grad(), trace_backends() as calls:
            paged = model.generate(**kwargs)
    finally:
        disable_paged_attention(model)
    assert torch.equal(stock, paged)
    assert {b for op, b in calls if op in ("write_kv", "paged_attention")} == {"triton"}
    window_bound(manager, rows=2)
