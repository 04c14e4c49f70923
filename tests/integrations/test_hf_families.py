"""Every family x every generate mode: paged generate equals stock generate.

Tokens identical, per-step logits within 1e-4 (fp32). Prompts are left-padded batches of
different lengths, block_size is 4, so every call crosses many block boundaries and stores
no pads.
"""

from __future__ import annotations

import torch


def test_greedy_padded_batch(family, model, stock_vs_paged, same_generation, helpers):
    ids, mask = helpers.padded_batch([11, 6, 9])
    inputs = {"input_ids": ids, "attention_mask": mask}
    stock, paged, manager = stock_vs_paged(model, inputs, max_new_tokens=10, do_sample=False)
    same_generation(stock, paged)
    assert manager.num_used_blocks == 0, "the generate call must free its sequences"


def test_sampling_same_seed(family, model, stock_vs_paged, same_generation, helpers):
    ids, mask = helpers.padded_batch([7, 10], seed=2)
    inputs = {"input_ids": ids, "attention_mask": mask}
    stock, paged, _ = stock_vs_paged(
        model, inputs, seed=123, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9
    )
    same_generation(stock, paged)


def test_beam_search(family, model, stock_vs_paged, same_generation, helpers):
    ids, mask = helpers.padded_batch([9, 5], seed=3)
    inputs = {"input_ids": ids, "attention_mask": mask}
    stock, paged, manager = stock_vs_paged(
        model,
        inputs,
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        output_scores=True,
    )
    same_generation(stock, paged)
    torch.testing.assert_close(paged.sequences_scores, stock.sequences_scores, atol=1e-4, rtol=0)
    assert manager.stats.cow_copies > 0, "beams share their last block until they diverge"
    used, private = stock_vs_paged.blocks[0]  # after the prefill: one prompt copy per batch row
    assert used == 9 // 4 + 1 + 5 // 4 + 1 and private == 3 * used
    assert all(u < p for u, p in stock_vs_paged.blocks), stock_vs_paged.blocks


def test_num_return_sequences(family, model, stock_vs_paged, same_generation, helpers):
    ids, mask = helpers.padded_batch([10, 6], seed=4)
    inputs = {"input_ids": ids, "attention_mask": mask}
    stock, paged, _ = stock_vs_paged(
        model, inputs, seed=7, max_new_tokens=6, do_sample=True, num_return_sequences=3
    )
    same_generation(stock, paged)
    used, private = stock_vs_paged.blocks[0]  # the 3 samples of a prompt share its blocks
    assert used == 10 // 4 + 1 + 6 // 4 + 1 and private == 3 * used


def test_prompt_lookup(family, model, stock_vs_paged, same_generation):
    pattern = [5, 17, 33, 8, 41, 12]
    ids = torch.tensor([pattern * 3 + pattern[:2]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    stock, paged, _ = stock_vs_paged(
        model, inputs, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3
    )
    same_generation(stock, paged)


def test_assisted_decoding(family, model, stock_vs_paged, same_generation, helpers):
    assistant = helpers.build_model(family, seed=1)
    ids, mask = helpers.padded_batch([12], seed=5)
    inputs = {"input_ids": ids, "attention_mask": mask}
    stock, paged, _ = stock_vs_paged(
        model, inputs, max_new_tokens=10, do_sample=False, assistant_model=assistant
    )
    same_generation(stock, paged)


def test_eos_stops(family, model, stock_vs_paged, same_generation, helpers):
    ids, mask = helpers.padded_batch([8, 5], seed=6)
    free_run = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    eos = int(free_run[0, ids.shape[1] + 3])  # row 0's 4th new token
    inputs = {"input_ids": ids, "attention_mask": mask}
    stock, paged, _ = stock_vs_paged(
        model, inputs, max_new_tokens=8, do_sample=False, eos_token_id=eos
    )
    same_generation(stock, paged)
    assert (paged.sequences[0, ids.shape[1] :] == eos).any()
