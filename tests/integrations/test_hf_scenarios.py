"""transformers' generation scenarios, ours, each on left-padded, right-padded and holed masks:
every output generate returns (tokens, scores, logits, hidden states) equals stock on the
same model and inputs. Leading pads are not stored, so hidden states there are compared only
for their shape (stock attends over padding at those positions; pagedkv has nothing there)."""

from __future__ import annotations

import pytest
import torch

from pagedkv.integrations import paged_attention

BS = 4
MASKS = {
    "left": [[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]],
    "right": [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]],
    "holed": [[1, 1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, 1, 1, 0]],
}
ONE_ROW = {  # the batch-of-one modes (assisted decoding, prompt lookup)
    "left": [[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]],
    "right": [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]],
    "holed": [[1, 1, 1, 0, 1, 1, 1, 1, 0, 1]],
}
DICT = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True}


def _inputs(mask_rows: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    mask = torch.tensor(mask_rows)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, mask.shape, generator=gen)
    ids[:, 4:] = ids[:, :1]  # repeated tokens: prompt lookup finds candidates
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _generate(model, inputs, kwargs):
    torch.manual_seed(kwargs.get("seed", 0))
    kwargs = {k: v for k, v in kwargs.items() if k != "seed"}
    with torch.no_grad():
        return model.generate(**inputs, pad_token_id=0, max_new_tokens=5, **kwargs)


def _stock_and_paged(model, inputs, kwargs):
    stock = _generate(model, inputs, kwargs)
    with paged_attention(model, block_size=BS) as manager:
        paged = _generate(model, inputs, kwargs)
        assert manager.num_used_blocks == 0
        manager.check_invariants()
    return stock, paged


def _assert_same(stock, paged, mask: torch.Tensor, expand: int = 1):
    if not isinstance(stock, torch.Tensor):
        _assert_same(stock.sequences, paged.sequences, mask)
        for name in ("scores", "logits"):
            for a, b in zip(getattr(stock, name) or (), getattr(paged, name) or (), strict=True):
                torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        if getattr(stock, "hidden_states", None) is not None:
            _assert_same_hidden(stock.hidden_states, paged.hidden_states, mask, expand)
        return
    assert torch.equal(paged, stock), (
        f"tokens differ:\nstock {stock.tolist()}\npaged {paged.tolist()}"
    )


def _assert_same_hidden(stock, paged, mask: torch.Tensor, expand: int):
    leading = (mask.cumsum(1) == 0).repeat_interleave(expand, 0)  # pads before the first token
    assert len(stock) == len(paged)
    for step, (a_layers, b_layers) in enumerate(zip(stock, paged, strict=True)):
        for a, b in zip(a_layers, b_layers, strict=True):
            assert a.shape == b.shape, f"step {step}: hidden states {b.shape} vs stock {a.shape}"
            keep = ~leading if step == 0 else torch.ones(a.shape[:2], dtype=torch.bool)
            torch.testing.assert_close(b[keep], a[keep], atol=1e-4, rtol=0)


@pytest.fixture
def llama(helpers):
    return helpers.build_model("llama")


@pytest.fixture(params=["as-measured", "forced-splits"])
def reference_splits(request, monkeypatch):
    """The CPU attention splits a call where that costs less (a call per prefill row, decodes
    in batches of similar lengths, a prefix every row shares attended once); these models are
    too small for most splits to pay, so "forced-splits" takes every one that applies."""
    if request.param == "forced-splits":
        from pagedkv.kernels import reference

        for name in ("_CALL_COST", "_BATCH_COST_ELEMENTS", "_SHARE_MIN_ELEMENTS"):
            monkeypatch.setattr(reference, name, 0)
    return request.param


@pytest.mark.usefixtures("reference_splits")
@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param({**DICT, "output_hidden_states": True}, id="greedy"),
        pytest.param(
            {**DICT, "do_sample": True, "num_return_sequences": 2, "seed": 3}, id="sample"
        ),
        pytest.param({**DICT, "num_beams": 3, "output_hidden_states": True}, id="beams-dict"),
        pytest.param({"num_beams": 2, "num_return_sequences": 2}, id="beams-plain"),
    ],
)
def test_generate_modes(llama, mask, mode):
    inputs = _inputs(MASKS[mask])
    stock, paged = _stock_and_paged(llama, inputs, mode)
    expand = mode.get("num_beams", 1) * (
        1 if "num_beams" in mode else mode.get("num_return_sequences", 1)
    )
    _assert_same(stock, paged, inputs["attention_mask"], expand)


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_inputs_embeds(llama, mask):
    inputs = _inputs(MASKS[mask], seed=1)
    embeds = {
        "inputs_embeds": llama.get_input_embeddings()(inputs["input_ids"]),
        "attention_mask": inputs["attention_mask"],
    }
    stock, paged = _stock_and_paged(llama, embeds, DICT)
    _assert_same(stock, paged, inputs["attention_mask"])


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_logits_to_keep(llama, mask):
    inputs = _inputs(MASKS[mask], seed=2)
    with torch.no_grad():
        stock = llama(**inputs, logits_to_keep=1).logits
        with paged_attention(llama, block_size=BS):
            paged = llama(**inputs, logits_to_keep=1).logits
    assert paged.shape == stock.shape == (3, 1, llama.config.vocab_size)
    torch.testing.assert_close(paged, stock, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask", sorted(ONE_ROW))
@pytest.mark.parametrize("mode", ["separate-assistant", "assistant-itself", "prompt-lookup"])
def test_one_row_modes(helpers, llama, mask, mode):
    inputs = _inputs(ONE_ROW[mask], seed=4)
    kwargs = dict(DICT)
    if mode == "separate-assistant":
        kwargs["assistant_model"] = helpers.build_model("llama", seed=5)
    elif mode == "assistant-itself":
        kwargs["assistant_model"] = llama
    else:
        kwargs["prompt_lookup_num_tokens"] = 2
    stock, paged = _stock_and_paged(llama, inputs, kwargs)
    _assert_same(stock, paged, inputs["attention_mask"])
