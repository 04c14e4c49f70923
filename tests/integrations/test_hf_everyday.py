"""Everyday transformers use that must give stock results, or a clear error (llama unless
noted): checkpoint generation configs, autograd, threads, foreign caches, notebook re-runs,
left-padded first forwards."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import GenerationConfig

from pagedkv.integrations import (
    PagedCache,
    disable_paged_attention,
    enable_paged_attention,
    get_manager,
    paged_attention,
)

BS = 4


def _generate(model, **kwargs):
    torch.manual_seed(kwargs.pop("seed", 0))
    with torch.no_grad():
        return model.generate(**{"pad_token_id": 0, "max_new_tokens": 5, **kwargs})


def _stock_then_paged(model, **kwargs):
    stock = _generate(model, **kwargs)
    with paged_attention(model, block_size=BS) as manager:
        paged = _generate(model, **kwargs)
        assert manager.num_used_blocks == 0
    return stock, paged


@pytest.fixture
def llama(helpers):
    return helpers.build_model("llama")


@pytest.mark.parametrize("how", ["model-generation-config", "GenerationConfig()"])
def test_use_cache_left_unset_generates_paged(llama, helpers, how):
    """Many checkpoints' generation_config.json omit use_cache (None): transformers then uses a
    cache, and so must pagedkv (it used to take None for False and fail on a DynamicCache)."""
    ids, mask = helpers.padded_batch([6, 4], seed=1)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if how == "GenerationConfig()":
        kwargs["generation_config"] = GenerationConfig(max_new_tokens=5, pad_token_id=0)
    else:
        llama.generation_config.use_cache = None
    stock = _generate(llama, **kwargs)
    manager = enable_paged_attention(llama, block_size=BS)
    paged = _generate(llama, **kwargs)
    assert torch.equal(paged, stock)
    assert manager.stats.prefix_queries > 0, "the call ran on the paged cache"


@pytest.mark.parametrize("family", ["llama", "falcon"])  # falcon: gathered K/V
def test_autograd_forward_gives_stock_logits_and_refuses_backward(helpers, family):
    model = helpers.build_model(family)
    ids, _ = helpers.padded_batch([7], seed=2)
    stock = model(input_ids=ids).logits
    enable_paged_attention(model, block_size=BS)
    paged = model(input_ids=ids).logits  # a notebook cell without no_grad
    torch.testing.assert_close(paged, stock, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="use_cache=False"):
        paged.sum().backward()


def test_a_forward_without_cache_trains_as_stock_on_a_gathered_model(helpers):
    ids, _ = helpers.padded_batch([7], seed=2)
    stock, paged = helpers.build_model("falcon"), helpers.build_model("falcon")
    enable_paged_attention(paged, block_size=BS)
    for model in (stock, paged):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for a, b in zip(paged.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)


def test_a_forward_without_cache_trains_as_stock(helpers):
    """use_cache=False runs the model's own attention: logits and gradients equal stock."""
    ids, mask = helpers.padded_batch([7, 5], seed=3)

    def loss_and_grads(model):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    stock_model, paged_model = helpers.build_model("llama"), helpers.build_model("llama")
    stock_loss, stock_grads = loss_and_grads(stock_model)
    enable_paged_attention(paged_model, block_size=BS)
    paged_loss, paged_grads = loss_and_grads(paged_model)
    torch.testing.assert_close(paged_loss, stock_loss, atol=0, rtol=0)
    for a, b in zip(paged_grads, stock_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_beams_with_use_cache_off_in_the_model_config(llama, helpers):
    llama.config.use_cache = False
    llama.generation_config.use_cache = False
    ids, mask = helpers.padded_batch([6, 4], seed=4)
    stock, paged = _stock_then_paged(llama, input_ids=ids, attention_mask=mask, num_beams=2)
    assert torch.equal(paged, stock)


def test_an_inherited_cache_implementation_is_ignored(helpers):
    """gemma2 checkpoints ship cache_implementation="hybrid" in their generation config."""
    model = helpers.build_model("gemma2")
    model.generation_config.cache_implementation = "hybrid"
    ids, mask = helpers.padded_batch([6, 4], seed=5)
    stock, paged = _stock_then_paged(model, input_ids=ids, attention_mask=mask)
    assert torch.equal(paged, stock)


def test_an_explicit_static_cache_is_refused_with_what_to_do(llama, helpers):
    ids, _ = helpers.padded_batch([5], seed=6)
    manager = enable_paged_attention(llama, block_size=BS)
    for kwargs in (
        {"cache_implementation": "static"},
        {"generation_config": GenerationConfig(cache_implementation="static", max_new_tokens=2)},
    ):
        with pytest.raises(ValueError, match="not compiled.*disable_paged_attention"):
            _generate(llama, input_ids=ids, **kwargs)
    assert manager.num_used_blocks == 0


def test_generate_from_two_threads_takes_turns(llama, helpers):
    batches = [helpers.padded_batch([6, 3], seed=7), helpers.padded_batch([9], seed=8)]
    stock = [_generate(llama, input_ids=i, attention_mask=m, max_new_tokens=8) for i, m in batches]
    manager = enable_paged_attention(llama, block_size=BS)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(k):
        try:
            ids, mask = batches[k % 2]
            for _ in range(3):
                results[k] = _generate(llama, input_ids=ids, attention_mask=mask, max_new_tokens=8)
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k, out in results.items():
        assert torch.equal(out, stock[k % 2])
    assert manager.num_used_blocks == 0
    manager.check_invariants()


def test_a_cache_of_another_models_manager_is_refused(helpers):
    a, b = helpers.build_model("llama"), helpers.build_model("llama", seed=1)
    enable_paged_attention(a, block_size=BS)
    enable_paged_attention(b, block_size=BS)
    ids, _ = helpers.padded_batch([5], seed=9)
    foreign = PagedCache(get_manager(a))
    with pytest.raises(ValueError, match="another KVCacheManager"):
        b(input_ids=ids, **{helpers.cache_kwarg(b): foreign})
    assert get_manager(a).num_used_blocks == 0 and get_manager(b).num_used_blocks == 0


def test_a_prompt_of_padding_only_is_refused_clearly(llama):
    ids = torch.tensor([[0, 0, 0, 0], [0, 7, 8, 9]])
    manager = enable_paged_attention(llama, block_size=BS)
    with pytest.raises(ValueError, match=r"prompt rows \[0\] have no token"):
        _generate(llama, input_ids=ids, attention_mask=(ids != 0).long())
    assert manager.num_used_blocks == 0 and not list(manager)


def test_enable_again_returns_the_manager_or_says_to_disable(llama, monkeypatch):
    import pagedkv.kvcache._memory as memory

    manager = enable_paged_attention(llama)  # the default pool: sized by the memory free now
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    assert enable_paged_attention(llama) is manager  # the cell run again, with less free
    monkeypatch.undo()
    disable_paged_attention(llama)
    manager = enable_paged_attention(llama, block_size=BS)
    assert enable_paged_attention(llama, block_size=BS) is manager
    with pytest.raises(ValueError, match="disable_paged_attention.model. first"):
        enable_paged_attention(llama, block_size=2 * BS)
    assert get_manager(llama) is manager
    disable_paged_attention(llama)
    with paged_attention(llama, block_size=BS) as inside:
        assert get_manager(llama) is inside
    assert get_manager(llama) is None
    stock_impl = llama.config._attn_implementation
    with pytest.raises(KeyError), paged_attention(llama, block_size=BS):
        raise KeyError("a block that raises disables too")
    assert llama.config._attn_implementation == stock_impl


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param({"output_hidden_states": True, "return_dict_in_generate": True}, id="hidden"),
        pytest.param({"prompt_lookup_num_tokens": 2}, id="prompt-lookup"),
        pytest.param({"assistant": True}, id="assisted-by-itself"),
    ],
)
def test_a_left_padded_first_forward_sees_every_column(llama, mode):
    """Without a cached prefix the first forward feeds every column, pads included, as stock
    does: hidden states have stock's shapes, and the modes whose first forward re-feeds the
    prompt (prompt lookup, assisted decoding) run."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 5, 6, 7]])
    kwargs = {"input_ids": ids, "attention_mask": (ids != 0).long(), **mode}
    if kwargs.pop("assistant", False):
        kwargs["assistant_model"] = llama
    stock, paged = _stock_then_paged(llama, **kwargs)
    if "output_hidden_states" in mode:
        assert [h[-1].shape for h in paged.hidden_states] == [
            h[-1].shape for h in stock.hidden_states
        ]
        stock, paged = stock.sequences, paged.sequences
    assert torch.equal(paged, stock)


@pytest.mark.parametrize("change", ["in-place", "load_state_dict"])
def test_changed_weights_drop_the_cached_prefixes(helpers, change):
    """K/V cached before the weights changed must not serve a later call."""
    model, other = helpers.build_model("llama"), helpers.build_model("llama", seed=1)
    ids, _ = helpers.padded_batch([13], seed=10)
    manager = enable_paged_attention(model, block_size=BS)
    _generate(model, input_ids=ids)
    assert manager.stats.num_cached_blocks > 0
    with torch.no_grad():
        if change == "in-place":
            for p in model.parameters():
                p.mul_(1.5)
        else:
            model.load_state_dict(other.state_dict())
    hits = manager.stats.prefix_hits
    paged = _generate(model, input_ids=ids)
    assert manager.stats.prefix_hits == hits, "a prefix computed with the old weights was reused"
    disable_paged_attention(model)
    assert torch.equal(paged, _generate(model, input_ids=ids))


def test_a_pickled_or_copied_model_is_stock_and_the_original_stays_paged(llama, helpers):
    import copy
    import io

    ids, _ = helpers.padded_batch([6], seed=11)
    stock = _generate(llama, input_ids=ids)
    manager = enable_paged_attention(llama, block_size=BS)
    buffer = io.BytesIO()
    torch.save(llama, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(llama)):
        assert get_manager(twin) is None and twin.config._attn_implementation == "eager"
        assert torch.equal(_generate(twin, input_ids=ids), stock)
        assert enable_paged_attention(twin, block_size=BS) is not manager
    assert torch.equal(_generate(llama, input_ids=ids), stock)
    assert get_manager(llama) is manager and manager.stats.prefix_queries > 0


def test_an_attention_implementation_switched_after_enable_is_refused(llama, helpers):
    ids, _ = helpers.padded_batch([6], seed=12)
    manager = enable_paged_attention(llama, block_size=BS)
    llama.config._attn_implementation = "eager"
    for call in (lambda: _generate(llama, input_ids=ids), lambda: llama(input_ids=ids)):
        with pytest.raises(ValueError, match="switched to .*'eager'.*disable_paged_attention"):
            call()
    assert manager.num_used_blocks == 0


def test_torch_compile_after_enable_gives_stock_results(llama, helpers):
    """`model.forward = torch.compile(model.forward)` in a notebook: the paged bookkeeping runs
    outside the graphs (it used to be traced, and the logits were silently wrong)."""
    ids, mask = helpers.padded_batch([8, 5], seed=13)
    with torch.no_grad():
        stock_logits = llama(input_ids=ids, attention_mask=mask).logits
    stock_tokens = _generate(llama, input_ids=ids, attention_mask=mask)
    manager = enable_paged_attention(llama, block_size=BS)
    llama.forward = torch.compile(llama.forward, backend="aot_eager")  # no codegen: fast on CPU
    with torch.no_grad():
        paged_logits = llama(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(paged_logits[real], stock_logits[real], atol=1e-4, rtol=0)
    assert torch.equal(_generate(llama, input_ids=ids, attention_mask=mask), stock_tokens)
    manager.check_invariants()
