"""Block sharing, prefix reuse, capacity, enable/disable, explicit caches (llama unless noted)."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from transformers import DynamicCache

from pagedkv.integrations import (
    ATTN_NAME,
    PagedCache,
    disable_paged_attention,
    enable_paged_attention,
)
from pagedkv.kernels import trace_backends, triton_interpreted
from pagedkv.kvcache import OutOfBlocksError

BS = 4


@pytest.fixture
def llama(helpers):
    return helpers.build_model("llama")


def _stock(model, **kwargs):
    torch.manual_seed(kwargs.pop("seed", 0))
    with torch.no_grad():
        return model.generate(pad_token_id=0, **kwargs)


def _paged(model, **kwargs):
    return _stock(model, **kwargs)  # same call; the model decides which path runs


class _Recorder:
    """Forward hook: the width of each forward's input and the blocks in use after it."""

    def __init__(self, model, manager):
        self.manager = manager
        self.widths: list[int] = []
        self.used: list[int] = []
        self.private: list[int] = []  # blocks the rows would need without sharing
        self.handle = model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        self.widths.append(ids.shape[1])
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        self.used.append(self.manager.num_used_blocks)
        self.private.append(sum(math.ceil(self.manager.seq_len(s) / BS) for s in cache.seq_ids))

    def remove(self):
        self.handle.remove()


def test_attention_reads_the_blocks(llama, helpers):
    ids, mask = helpers.padded_batch([9, 4])
    stock = _stock(llama, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    enable_paged_attention(llama, block_size=BS)
    with trace_backends() as calls:
        paged = _paged(llama, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(stock, paged)
    ops = {op for op, _ in calls}
    assert {"write_kv", "paged_attention"} <= ops
    assert "gather_kv" not in ops, "no per-step gather"
    # one write and one attention per layer per forward (prefill + 5 decode steps)
    assert sum(op == "paged_attention" for op, _ in calls) == 2 * 6


def test_beam_search_shares_blocks(llama, helpers):
    ids, mask = helpers.padded_batch([10], seed=8)
    stock = _stock(llama, input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=4)
    manager = enable_paged_attention(llama, block_size=BS)
    rec = _Recorder(llama, manager)
    paged = _paged(llama, input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=4)
    rec.remove()
    assert torch.equal(stock, paged)
    # after the prefill the 4 beams hold one copy of the prompt: ceil(10 / 4) = 3 blocks
    assert rec.used[0] == 3 and rec.private[0] == 4 * 3
    assert all(u < p for u, p in zip(rec.used, rec.private, strict=True)), (rec.used, rec.private)
    assert manager.stats.cow_copies > 0
    assert manager.num_used_blocks == 0


def test_num_return_sequences_share_prompt_blocks(llama, helpers):
    ids, mask = helpers.padded_batch([9, 13], seed=9)
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=True,
        num_return_sequences=4,
        seed=3,
    )
    stock = _stock(llama, **kwargs)
    manager = enable_paged_attention(llama, block_size=BS)
    rec = _Recorder(llama, manager)
    paged = _paged(llama, **kwargs)
    rec.remove()
    assert torch.equal(stock, paged)
    assert rec.used[0] == math.ceil(9 / BS) + math.ceil(13 / BS)
    assert rec.private[0] == 4 * rec.used[0]


@pytest.mark.parametrize("family", ["llama", "falcon"])  # paged attention; gathered K/V
def test_prefix_reuse_across_calls(family, helpers):
    model = helpers.build_model(family)
    prompt, _ = helpers.padded_batch([13], seed=10)
    longer = torch.cat([prompt, torch.tensor([[7, 9, 11, 13, 15]])], dim=1)  # 18 tokens
    stock1 = _stock(model, input_ids=prompt, max_new_tokens=8)
    stock2 = _stock(model, input_ids=longer, max_new_tokens=8)
    chat = torch.cat([stock1, torch.tensor([[21, 22, 23]])], dim=1)  # turn 1 + answer + 3
    stock3 = _stock(model, input_ids=chat, max_new_tokens=8)

    manager = enable_paged_attention(model, block_size=BS)
    rec = _Recorder(model, manager)
    assert torch.equal(_paged(model, input_ids=prompt, max_new_tokens=8), stock1)
    assert rec.widths[0] == 13  # nothing cached yet
    hits = manager.stats.prefix_hits

    rec.widths.clear()
    assert torch.equal(_paged(model, input_ids=longer, max_new_tokens=8), stock2)
    assert rec.widths[0] == 18 - 12, "3 full blocks of the first prompt are reused"
    assert manager.stats.prefix_hits == hits + 12

    # turn 2 of a chat: turn 1 stored 13 + 8 - 1 = 20 tokens = 5 full blocks
    rec.widths.clear()
    assert torch.equal(_paged(model, input_ids=chat, max_new_tokens=8), stock3)
    assert rec.widths[0] == chat.shape[1] - 20
    rec.remove()
    assert manager.num_used_blocks == 0


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_prefix_reuse_padded_batch_and_expansion(family, helpers):
    model = helpers.build_model(family)
    base, _ = helpers.padded_batch([10, 7], seed=11)
    rows = [base[0].tolist(), base[1, 3:].tolist()]
    ext = [rows[0] + [31, 32], rows[1] + [33, 34, 35, 36, 37, 38]]  # 12 and 13 tokens
    width = max(map(len, ext))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(ext):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    for extra in ({}, {"do_sample": True, "num_return_sequences": 2, "seed": 5}):
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, **extra)
        stock = _stock(model, **kwargs)
        manager = enable_paged_attention(model, block_size=BS)
        for row in rows:  # cache each prompt alone first (2 new tokens)
            _paged(model, input_ids=torch.tensor([row]), max_new_tokens=2)
        rec = _Recorder(model, manager)
        paged = _paged(model, **kwargs)
        rec.remove()
        disable_paged_attention(model)
        assert torch.equal(stock, paged)
        # row 0: 1 pad + 2 cached blocks (8 tokens); row 1: 0 pads + 1 cached block (its
        # second block held the first call's answer token) -> transformers starts at column 4
        assert rec.widths[0] == width - 4


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="decode"),
        pytest.param({"num_beams": 3}, id="beams"),
        pytest.param({"prefill_chunk_size": 4}, id="chunked-prefill"),
    ],
)
def test_out_of_blocks_frees_the_call(llama, helpers, extra):
    ids, mask = helpers.padded_batch([10, 8], seed=12)
    manager = enable_paged_attention(llama, block_size=BS, num_blocks=8)
    with pytest.raises(OutOfBlocksError, match="num_blocks") as info:
        _paged(llama, input_ids=ids, attention_mask=mask, max_new_tokens=20, **extra)
    assert info.value.total == 8 and info.value.needed > info.value.free
    assert manager.num_used_blocks == 0 and not list(manager), "the failed call left blocks"
    manager.check_invariants()
    disable_paged_attention(llama)
    stock = _stock(llama, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    enable_paged_attention(llama, block_size=BS, num_blocks=8)
    assert torch.equal(_paged(llama, input_ids=ids, attention_mask=mask, max_new_tokens=4), stock)


def test_a_prompt_that_does_not_fit_leaves_no_unwritten_prefix(llama):
    """Found by the session test: rows 1 and 2 reserve (and register) their prompt blocks, row
    3 runs out; those blocks were never written, so a later prompt must not hit them."""
    first = torch.tensor([[0] * 14 + [5, 17, 33], [5, 17, 33, 8, 41, 12, 9, 30, 44] + [3] * 8])
    mask = (first != 0).long()
    manager = enable_paged_attention(llama, block_size=2, num_blocks=10)
    with pytest.raises(OutOfBlocksError):
        _paged(llama, input_ids=first, attention_mask=mask, max_new_tokens=1, num_beams=3)
    assert manager.stats.num_cached_blocks == 0
    paged = _paged(llama, input_ids=first[:1, 14:], max_new_tokens=3, num_beams=3)
    disable_paged_attention(llama)
    assert torch.equal(
        paged, _stock(llama, input_ids=first[:1, 14:], max_new_tokens=3, num_beams=3)
    )


def test_disable_restores_stock(llama, helpers):
    ids, mask = helpers.padded_batch([9, 5], seed=13)
    before = _stock(llama, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    impl = llama.config._attn_implementation
    enable_paged_attention(llama, block_size=BS)
    assert llama.config._attn_implementation == ATTN_NAME
    assert "generate" in llama.__dict__
    disable_paged_attention(llama)
    assert llama.config._attn_implementation == impl
    assert "generate" not in llama.__dict__
    assert not llama._forward_pre_hooks and not llama._forward_hooks
    after = _stock(llama, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="not enabled"):
        disable_paged_attention(llama)


def test_explicit_paged_cache_and_continuation(llama, helpers):
    key = helpers.cache_kwarg(llama)
    ids, mask = helpers.padded_batch([8, 6], seed=14)
    stock_cache = DynamicCache(config=llama.config)
    stock1 = _stock(
        llama, input_ids=ids, attention_mask=mask, max_new_tokens=5, **{key: stock_cache}
    )
    mask2 = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    stock2 = _stock(
        llama, input_ids=stock1, attention_mask=mask2, max_new_tokens=5, **{key: stock_cache}
    )

    manager = enable_paged_attention(llama, block_size=BS)
    _paged(llama, input_ids=ids, attention_mask=mask, max_new_tokens=1)  # caches the prompts
    cache = PagedCache(manager)
    rec = _Recorder(llama, manager)
    paged1 = _paged(llama, input_ids=ids, attention_mask=mask, max_new_tokens=5, **{key: cache})
    rec.remove()
    assert torch.equal(paged1, stock1)
    # an empty PagedCache also starts from cached prefixes: row 0 (no pads) holds 4 of its 8
    # tokens, row 1 (2 pads) 4 of 6, so transformers starts at column min(0 + 4, 2 + 4) = 4
    assert rec.widths[0] == 8 - 4
    assert manager.num_used_blocks > 0, "the caller's cache keeps its blocks"
    assert cache.get_seq_length() == 8 + 4  # padded width + tokens fed
    paged2 = _paged(llama, input_ids=paged1, attention_mask=mask2, max_new_tokens=5, **{key: cache})
    assert torch.equal(paged2, stock2)
    # pads are not stored: row 1 holds 2 fewer tokens than the padded width
    assert [manager.seq_len(s) for s in cache.seq_ids] == [8 + 9, 6 + 9]
    cache.free()
    assert manager.num_used_blocks == 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])  # rotary and absolute positions
def test_forward_without_cache(family, helpers):
    model = helpers.build_model(family)
    ids, mask = helpers.padded_batch([7, 4], seed=15)
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits
        manager = enable_paged_attention(model, block_size=BS)
        out = model(input_ids=ids, attention_mask=mask)
        transient = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], stock[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(transient[real], stock[real], atol=1e-4, rtol=0)
    cache = out.past_key_values
    assert isinstance(cache, PagedCache) and manager.num_used_blocks == 2 + 1
    del out, cache
    gc.collect()
    assert manager.num_used_blocks == 0, "a dropped PagedCache frees its blocks"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_manual_decode_loop(family, helpers):
    """model(...) step by step with an explicit cache and no position ids, as users write it."""
    model = helpers.build_model(family)
    key = helpers.cache_kwarg(model)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(19))

    def loop(cache):
        logits, step = [], ids
        with torch.no_grad():
            for _ in range(5):
                out = model(input_ids=step, **{key: cache})
                logits.append(out.logits[:, -1])
                step = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits)

    stock = loop(DynamicCache(config=model.config))
    manager = enable_paged_attention(model, block_size=BS)
    cache = PagedCache(manager)
    paged = loop(cache)
    torch.testing.assert_close(paged, stock, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == 6 + 4


def test_stock_cache_rejected(llama, helpers):
    ids, mask = helpers.padded_batch([5], seed=16)
    enable_paged_attention(llama, block_size=BS)
    with pytest.raises(TypeError, match="PagedCache"):
        _paged(
            llama,
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=2,
            **{helpers.cache_kwarg(llama): DynamicCache(config=llama.config)},
        )


def test_models_outside_the_registry_use_gather(helpers):
    families = list(helpers.gather_families)
    families += [f for f in helpers.families if not helpers.uses_registry(helpers.build_model(f))]
    for family in dict.fromkeys(families):
        model = helpers.build_model(family)
        impl = model.config._attn_implementation
        ids, mask = helpers.padded_batch([7, 4], seed=20)
        stock = _stock(model, input_ids=ids, attention_mask=mask, max_new_tokens=5)
        enable_paged_attention(model, block_size=BS)
        assert model.config._attn_implementation == impl, "its own attention stays"
        with trace_backends() as calls:
            paged = _paged(model, input_ids=ids, attention_mask=mask, max_new_tokens=5)
        disable_paged_attention(model)
        assert torch.equal(stock, paged), family
        ops = {op for op, _ in calls}
        assert {"write_kv", "gather_kv"} <= ops and "paged_attention" not in ops, (family, ops)


def test_probe_refuses_a_model_the_cache_does_not_fit(llama):
    from pagedkv.kvcache import KVCacheConfig

    config = KVCacheConfig(num_layers=3, num_kv_heads=2, head_dim=16, block_size=BS, num_blocks=64)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*layers \[2\] did not store K/V"):
        enable_paged_attention(llama, config)
    assert llama.config._attn_implementation == "eager" and "generate" not in llama.__dict__
    assert not llama._forward_pre_hooks


def test_encoder_decoder_refused():
    import transformers as tf

    config = tf.BartConfig(
        vocab_size=96,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
    )
    model = tf.BartForConditionalGeneration(config)
    with pytest.raises(ValueError, match="BartForConditionalGeneration is an encoder-decoder"):
        enable_paged_attention(model)


def test_kv_bytes_held(llama, helpers):
    ids, mask = helpers.padded_batch([9, 3], seed=17)
    manager = enable_paged_attention(llama, block_size=BS)
    rec = _Recorder(llama, manager)
    seen = []
    hook = llama.register_forward_hook(lambda *a: seen.append(manager.used_bytes))
    _paged(llama, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    hook.remove()
    rec.remove()
    per_block = manager.config.bytes_per_block
    assert per_block == 2 * 2 * BS * 2 * 16 * 4  # K+V, layers, block, kv heads, head_dim, fp32
    assert seen == [u * per_block for u in rec.used]
    # 9 + 3 real tokens, then 2 more per step: pads hold nothing
    assert rec.used[0] == math.ceil(9 / BS) + math.ceil(3 / BS)


def test_triton_kernels_serve_generate(llama, helpers, monkeypatch):
    if not triton_interpreted():
        pytest.skip("the Triton kernels were not decorated under TRITON_INTERPRET=1")
    ids, mask = helpers.padded_batch([6, 3], seed=18)
    stock = _stock(llama, input_ids=ids, attention_mask=mask, max_new_tokens=3)
    monkeypatch.setenv("PAGEDKV_BACKEND", "triton")
    enable_paged_attention(llama, block_size=BS)
    with trace_backends() as calls:
        paged = _paged(llama, input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(stock, paged)
    assert {b for op, b in calls if op in ("write_kv", "paged_attention")} == {"triton"}


def test_assisted_decoding_with_paged_assistant(llama, helpers):
    assistant = helpers.build_model("llama", seed=1)
    ids, mask = helpers.padded_batch([11], seed=21)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, assistant_model=assistant)
    stock = _stock(llama, **kwargs)
    enable_paged_attention(llama, block_size=BS)
    assistant_manager = enable_paged_attention(assistant, block_size=BS)
    rec = _Recorder(assistant, assistant_manager)
    paged = _paged(llama, **kwargs)
    rec.remove()
    assert torch.equal(stock, paged)
    # the assistant keeps its cache between its generate calls: after its first call it only
    # computes the tokens it has not seen (never the whole prompt again)
    assert rec.widths[0] == 11 and max(rec.widths[1:]) < 11, rec.widths
    gc.collect()
    assert assistant_manager.num_used_blocks == 0


def test_chunked_prefill(llama, helpers):
    ids, mask = helpers.padded_batch([13, 6], seed=22)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, prefill_chunk_size=4)
    stock = _stock(llama, **kwargs)
    manager = enable_paged_attention(llama, block_size=BS)
    _paged(llama, input_ids=ids[:1, 2:], max_new_tokens=2)  # a cached prefix: not reused here
    rec = _Recorder(llama, manager)
    assert torch.equal(_paged(llama, **kwargs), stock)
    rec.remove()
    assert rec.widths[:4] == [4, 4, 4, 1], rec.widths


def test_probe_refuses_a_window_the_attention_does_not_get():
    """A config that slides a window the attention call never receives: refuse, don't guess."""
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match=r"layers \[0\] have a sliding window"):
        enable_paged_attention(model, block_size=BS)


def test_cache_implementation_conflict(llama, helpers):
    ids, mask = helpers.padded_batch([5], seed=23)
    enable_paged_attention(llama, block_size=BS)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        _paged(llama, input_ids=ids, max_new_tokens=2, cache_implementation="static")


def test_inputs_embeds(llama, helpers):
    ids, mask = helpers.padded_batch([8, 5], seed=24)
    embeds = llama.get_input_embeddings()(ids).detach()
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5)
    stock = _stock(llama, **kwargs)
    manager = enable_paged_attention(llama, block_size=BS)
    assert torch.equal(_paged(llama, **kwargs), stock)
    assert manager.num_used_blocks == 0


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_forward_leaves_no_stale_prefix(llama, helpers, error):
    """A forward that dies after reserving slots (an error, Ctrl-C in a notebook) must not leave
    its unwritten blocks findable, and keeps the prefixes cached before it."""
    gen = torch.Generator().manual_seed(25)
    first = torch.randint(3, 90, (1, 9), generator=gen)  # blocks [0:4] and [4:8] get cached
    prompt = torch.cat([first[:, :8], torch.randint(3, 90, (1, 9), generator=gen)], dim=1)
    stock = _stock(llama, input_ids=prompt, max_new_tokens=4)
    manager = enable_paged_attention(llama, block_size=BS)
    _paged(llama, input_ids=first, max_new_tokens=1)
    cached = manager.stats.num_cached_blocks

    def boom(*args):
        raise error("boom")

    handle = llama.model.layers[1].register_forward_pre_hook(boom)
    with pytest.raises(error, match="boom"):
        _paged(llama, input_ids=prompt, max_new_tokens=4)
    handle.remove()
    assert manager.num_used_blocks == 0
    assert manager.stats.num_cached_blocks == cached, "only the failed call's blocks are gone"
    rec = _Recorder(llama, manager)
    assert torch.equal(_paged(llama, input_ids=prompt, max_new_tokens=4), stock)
    rec.remove()
    assert rec.widths[0] == prompt.shape[1] - 8, "the earlier prefix is reused, nothing stale"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_forward_on_a_held_cache_runs_again(llama, helpers, error):
    """A manual loop's forward dies in a layer: its cache is as before it (Ctrl-C skips the
    forward hook; the next forward aborts the open step), and the same forward run again gives
    stock logits."""
    key = helpers.cache_kwarg(llama)
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        stock = llama(input_ids=ids).logits
    manager = enable_paged_attention(llama, block_size=BS)
    cache = PagedCache(manager)
    with torch.no_grad():
        llama(input_ids=ids[:, :5], **{key: cache})
        handle = llama.model.layers[1].register_forward_pre_hook(
            lambda *a: (_ for _ in ()).throw(error("boom"))
        )
        with pytest.raises(error, match="boom"):
            llama(input_ids=ids[:, 5:], **{key: cache})
        handle.remove()
        assert cache.get_seq_length() == 5
        again = llama(input_ids=ids[:, 5:], **{key: cache}).logits
    torch.testing.assert_close(again, stock[:, 5:], atol=1e-4, rtol=0)
    assert [manager.seq_len(s) for s in cache.seq_ids] == [9, 9]
    manager.check_invariants()
    cache.free()
    assert manager.num_used_blocks == 0


@pytest.mark.parametrize(
    ("mode", "turn2_mode"),
    [
        pytest.param({"num_beams": 3}, {"num_beams": 3}, id="beams"),
        pytest.param(
            {"do_sample": True, "num_return_sequences": 3, "seed": 4},
            {"do_sample": True, "num_return_sequences": 2, "seed": 5},
            id="samples",
        ),
        # assisted decoding and chunked prefill re-feed the whole prompt in their first forward,
        # so their calls do not start from the prefix cache; a later plain call does
        pytest.param({"prompt_lookup_num_tokens": 2}, {}, id="prompt-lookup"),
        pytest.param({"prefill_chunk_size": 4}, {}, id="chunked-prefill"),
    ],
)
def test_turn_two_reuses_the_answer(llama, mode, turn2_mode):
    """Every row's prompt + answer blocks are registered, beams and crops included."""
    pattern = [5, 17, 33, 8, 41, 12, 9]
    prompt = torch.tensor([pattern + pattern[:3]])  # 10 tokens, repetitive for prompt lookup
    kwargs = dict(max_new_tokens=8, min_new_tokens=8)  # no early eos
    stock1 = _stock(llama, input_ids=prompt, **kwargs, **mode)
    turn2 = torch.cat([stock1[:1], torch.tensor([[21, 22, 23]])], dim=1)
    mask2 = torch.ones_like(turn2)
    stock2 = _stock(llama, input_ids=turn2, attention_mask=mask2, **kwargs, **turn2_mode)

    manager = enable_paged_attention(llama, block_size=BS)
    assert torch.equal(_paged(llama, input_ids=prompt, **kwargs, **mode), stock1)
    rec = _Recorder(llama, manager)
    paged2 = _paged(llama, input_ids=turn2, attention_mask=mask2, **kwargs, **turn2_mode)
    rec.remove()
    assert torch.equal(paged2, stock2)
    stored = stock1.shape[1] - 1  # turn 1's row 0 holds all but its last token
    cached = min(stored // BS, (turn2.shape[1] - 1) // BS) * BS
    assert rec.widths[0] == turn2.shape[1] - cached, (rec.widths[0], turn2.shape[1], cached)


def test_assisted_call_does_not_start_from_the_cache(llama):
    """Prompt lookup feeds the whole prompt first: a cached prefix must not be counted twice."""
    pattern = [5, 17, 33, 8, 41, 12, 9]
    prompt = torch.tensor([pattern * 2 + pattern[:3]])
    kwargs = dict(max_new_tokens=8, prompt_lookup_num_tokens=2, output_logits=True)
    kwargs["return_dict_in_generate"] = True
    stock = _stock(llama, input_ids=prompt, **kwargs)
    enable_paged_attention(llama, block_size=BS)
    _paged(llama, input_ids=prompt, max_new_tokens=2)  # caches the prompt's blocks
    paged = _paged(llama, input_ids=prompt, **kwargs)
    assert torch.equal(paged.sequences, stock.sequences)
    for a, b in zip(paged.logits, stock.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
