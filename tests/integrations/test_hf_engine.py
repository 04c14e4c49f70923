"""Continuous batching (`generate_batch`, `BatchingEngine`) on tiny random models, against stock
`generate` of each prompt alone."""

from __future__ import annotations

import pytest
import torch

from pagedkv.integrations import (
    BatchingEngine,
    disable_paged_attention,
    enable_paged_attention,
    generate_batch,
    get_manager,
)

from .conftest import EOS, PAD, VOCAB, build_model

# A sliding-window family (window 8), one mixing sliding and full layers, attention sinks.
ENGINE_FAMILIES = ["llama", "mistral", "gemma3", "gpt_oss"]


def prompts_and_limits(count: int, seed: int = 0, longest: int = 40):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (count,), generator=gen).tolist()
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    limits = torch.randint(1, 24, (count,), generator=gen).tolist()
    return prompts, limits


def stock(model, prompt, max_new_tokens, **kwargs):
    """Stock greedy `generate` of one prompt: its new ids, the eos token included when hit."""
    enabled = get_manager(model) is not None
    if enabled:  # the oracle runs stock attention on the same weights
        raise AssertionError("call stock() on a model without paged attention")
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


def stock_all(model, prompts, limits, **kwargs):
    return [stock(model, p, n, **kwargs) for p, n in zip(prompts, limits, strict=True)]


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_generate_batch_equals_stock(family):
    """Chunked prompts (budget 16 tokens), decodes beside them, rows leaving as they finish."""
    model = build_model(family)
    prompts, limits = prompts_and_limits(7)
    expected = stock_all(model, prompts, limits, eos_token_id=None)
    got = generate_batch(
        model, prompts, max_new_tokens=limits, eos_token_id=None, max_num_batched_tokens=16
    )
    assert got == expected
    assert get_manager(model) is None  # a model that was not enabled is left as it was
    assert model.config._attn_implementation == "eager"


def test_generate_batch_stops_at_eos_like_stock():
    model = build_model("llama")
    prompts, _ = prompts_and_limits(5, seed=3)
    free_run = stock_all(model, prompts, [12] * 5, eos_token_id=None)
    stop = free_run[0][3]  # a token row 0 produces: it ends there, others wherever it appears
    other = free_run[1][5]
    expected = stock_all(model, prompts, [12] * 5, eos_token_id=[stop, other])
    got = generate_batch(model, prompts, max_new_tokens=12, eos_token_id=[stop, other])
    assert got == expected
    assert got[0][-1] == stop and len(got[0]) == 4


def test_generate_batch_on_an_enabled_model_uses_its_manager():
    model = build_model("llama")
    prompts, limits = prompts_and_limits(6, seed=1)
    expected = stock_all(model, prompts, limits, eos_token_id=None)
    manager = enable_paged_attention(model, block_size=4, num_blocks=256)
    got = generate_batch(model, prompts, max_new_tokens=limits, eos_token_id=None)
    assert got == expected
    assert get_manager(model) is manager  # still enabled
    assert manager.num_used_blocks == 0 and not manager.seq_ids
    manager.check_invariants()
    # A second call with the same prompts starts from their cached prefixes.
    hits = manager.stats.prefix_hits
    assert generate_batch(model, prompts, max_new_tokens=limits, eos_token_id=None) == expected
    assert manager.stats.prefix_hits > hits
    # model.generate still works beside it
    ids = torch.tensor([prompts[0]])
    out = model.generate(ids, max_new_tokens=limits[0], do_sample=False, eos_token_id=None)
    assert out[0, len(prompts[0]) :].tolist() == expected[0]
    disable_paged_attention(model)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_small_pool_preempts_and_gives_the_same_tokens(family, preemption):
    model = build_model(family)
    prompts, limits = prompts_and_limits(8, seed=2)
    limits = [max(n, 12) for n in limits]
    expected = stock_all(model, prompts, limits, eos_token_id=None)
    cpu = 64 if preemption == "swap" else 0
    blocks = 24 if family == "llama" else 10  # mistral's window (8) holds few blocks per row
    enable_paged_attention(model, block_size=4, num_blocks=blocks, num_cpu_blocks=cpu)
    with BatchingEngine(model, preemption=preemption, eos_token_id=None) as engine:
        ids = [engine.add_request(p, max_new_tokens=n) for p, n in zip(prompts, limits)]
        list(engine)
        assert [engine.result(i) for i in ids] == expected
        assert engine.scheduler.num_preemptions > 0
        if preemption == "swap":
            assert engine.scheduler.num_swaps > 0
        assert engine.manager.num_used_blocks == 0
        engine.manager.check_invariants()
    disable_paged_attention(model)


def test_streaming_engine_add_cancel_timings():
    model = build_model("llama")
    prompts, limits = prompts_and_limits(4, seed=4)
    limits = [10, 10, 10, 10]
    expected = stock_all(model, prompts, limits, eos_token_id=None)
    manager = enable_paged_attention(model, block_size=4, num_blocks=128)
    engine = BatchingEngine(model, max_new_tokens=10, eos_token_id=None)
    a = engine.add_request(prompts[0])
    engine.add_request(torch.tensor(prompts[1]), request_id="b")
    seen: dict = {}
    added_late = cancelled = None
    for request_id, new, finished in engine:
        seen.setdefault(request_id, []).extend(new)
        if added_late is None and len(seen.get(a, [])) == 2:
            added_late = engine.add_request(prompts[2])  # joins while the others run
            cancelled = engine.add_request(prompts[3], request_id="c")
        if cancelled is not None and request_id == "c" and engine.status("c") == "running":
            held = manager.num_used_blocks
            engine.cancel("c")  # its blocks are freed at once
            assert manager.num_used_blocks < held
            assert engine.status("c") == "cancelled"
        if finished:
            assert engine.status(request_id) == "finished"
    assert seen[a] == engine.result(a) == expected[0]
    assert seen["b"] == expected[1]
    assert seen[added_late] == expected[2]
    assert seen["c"] == expected[3][:1]
    timing = engine.timings(a)
    assert timing.num_tokens == 10 and timing.time_to_first_token > 0
    assert timing.total_time >= timing.time_to_first_token and timing.tokens_per_second > 0
    assert engine.stats.num_seqs == 0 and manager.num_used_blocks == 0
    engine.close()
    assert get_manager(model) is manager  # enabled before: stays enabled
    disable_paged_attention(model)


def test_bad_requests_are_refused_and_leave_the_engine_usable():
    model = build_model("llama")
    enable_paged_attention(model, block_size=4, num_blocks=16)
    with BatchingEngine(model, max_new_tokens=4, eos_token_id=None) as engine:
        good = engine.add_request([5, 6, 7], request_id="good")
        free = engine.manager.num_free_blocks
        cases = [
            (dict(prompt=[], request_id="empty"), "'empty'.*prompt is empty"),
            (dict(prompt=list(range(3, 90)), request_id="long"), "'long'.*pool holds 16"),
            (dict(prompt=[5], request_id="zero", max_new_tokens=0), "'zero'.*max_new_tokens"),
            (dict(prompt=[5], request_id="good"), "'good' is already queued"),
            (dict(prompt=[5], request_id="beams", num_beams=2), "'beams'.*num_beams=2.*generate"),
            (dict(prompt=[5], request_id="opt", min_new_tokens=3), "'opt'.*min_new_tokens"),
            (dict(prompt=[5], request_id="temp", do_sample=True, temperature=0.0), "'temp'.*temp"),
            (dict(prompt=[[5]], request_id="nested"), "'nested'"),
            (dict(prompt=[5, VOCAB], request_id="oov"), f"'oov'.*token id {VOCAB}.*vocabulary"),
            (dict(prompt=[-1], request_id="neg"), "'neg'.*token id -1"),
        ]
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=message):
                engine.add_request(**kwargs)
        with pytest.raises(ValueError, match=r"request id \[1\] is not hashable"):
            engine.add_request([5], request_id=[1])
        with pytest.raises(ValueError, match="unknown request id 'nope'|'nope'"):
            engine.cancel("nope")
        assert engine.manager.num_free_blocks == free
        assert [r.request_id for r in engine.scheduler.requests()] == [good]
        list(engine)
        assert engine.result(good) == stock(_stock_copy(model), [5, 6, 7], 4, eos_token_id=None)
    disable_paged_attention(model)


def _stock_copy(model):
    fresh = build_model("llama")
    fresh.load_state_dict(model.state_dict())
    return fresh


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_failed_forward_leaves_every_request_where_it_was(interrupt):
    model = build_model("llama")
    prompts, limits = prompts_and_limits(4, seed=5)
    expected = stock_all(model, prompts, limits, eos_token_id=None)
    manager = enable_paged_attention(model, block_size=4, num_blocks=128)
    calls = {"n": 0}

    def fail_sometimes(module, args):
        calls["n"] += 1
        if calls["n"] in (3, 8):
            raise interrupt("stop")

    handle = model.model.layers[1].register_forward_pre_hook(fail_sometimes)
    engine = BatchingEngine(model, eos_token_id=None, max_num_batched_tokens=12)
    ids = [engine.add_request(p, max_new_tokens=n) for p, n in zip(prompts, limits)]
    failures = 0
    while engine.has_unfinished:
        try:
            engine.step()
        except interrupt:
            failures += 1
            manager.check_invariants()
    handle.remove()
    assert failures == 2
    assert [engine.result(i) for i in ids] == expected
    assert manager.num_used_blocks == 0
    engine.close()
    disable_paged_attention(model)


def test_sampling_is_reproducible_whatever_the_batch():
    model = build_model("llama")
    prompts, _ = prompts_and_limits(5, seed=6)
    settings = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, eos_token_id=None)
    alone = generate_batch(model, prompts[:1], max_new_tokens=12, seed=7, **settings)
    expected_greedy = stock(model, prompts[1], 6, eos_token_id=None)
    with BatchingEngine(model, eos_token_id=None) as engine:
        others = [engine.add_request(p, max_new_tokens=9, seed=i) for i, p in enumerate(prompts)]
        target = engine.add_request(prompts[0], max_new_tokens=12, seed=7, **settings)
        greedy = engine.add_request(prompts[1], max_new_tokens=6)
        list(engine)
        assert engine.result(target) == alone[0]
        assert engine.result(greedy) == expected_greedy
        assert len({tuple(engine.result(i)) for i in others}) > 1
    again = generate_batch(model, prompts[:1], max_new_tokens=12, seed=8, **settings)
    assert again != alone  # another seed, another draw (12 tokens of a random model)


def test_repetition_penalty_equals_stock():
    model = build_model("llama")
    prompts, limits = prompts_and_limits(4, seed=7)
    expected = stock_all(model, prompts, limits, eos_token_id=None, repetition_penalty=1.5)
    got = generate_batch(
        model, prompts, max_new_tokens=limits, eos_token_id=None, repetition_penalty=1.5
    )
    assert got == expected


def test_gathered_attention_models_are_refused_clearly():
    model = build_model("falcon")
    with pytest.raises(ValueError, match="gathered K/V.*model.generate"):
        generate_batch(model, [[5, 6]], max_new_tokens=2)
    assert get_manager(model) is None


def test_generate_batch_arguments(capsys):
    model = build_model("llama")
    with pytest.raises(ValueError, match="one per prompt"):
        generate_batch(model, [[5], [6]], max_new_tokens=[3])
    with pytest.raises(ValueError, match="list of token-id lists"):
        generate_batch(model, torch.tensor([[5, 6]]), max_new_tokens=3)
    assert get_manager(model) is None
    out = generate_batch(model, [[5, 6], [7]], max_new_tokens=[3, 2], progress=True)
    assert [len(o) for o in out] == [3, 2] or EOS in sum(out, [])
    assert "generate_batch" in capsys.readouterr().err


def test_generate_batch_on_a_given_manager_leaves_the_model_stock():
    from pagedkv.kvcache import KVCacheConfig, KVCacheManager

    model = build_model("gemma3")
    prompts, limits = prompts_and_limits(4, seed=8)
    expected = stock_all(model, prompts, limits, eos_token_id=None)
    config = KVCacheConfig.from_model_config(model.config, block_size=4, num_blocks=64)
    manager = KVCacheManager(config)
    got = generate_batch(model, prompts, max_new_tokens=limits, eos_token_id=None, manager=manager)
    assert got == expected
    assert get_manager(model) is None and model.config._attn_implementation == "eager"
    assert manager.num_used_blocks == 0 and manager.stats.prefix_queries > 0
    wrong = KVCacheManager(config.replace(head_dim=config.head_dim * 2))
    with pytest.raises(ValueError, match="head_dim"):
        generate_batch(model, prompts, max_new_tokens=2, manager=wrong)
    assert get_manager(model) is None


def test_an_engine_seed_gives_request_i_the_seed_plus_i():
    model = build_model("llama")
    prompts, _ = prompts_and_limits(3, seed=9)
    settings = dict(do_sample=True, top_k=0, eos_token_id=None, max_new_tokens=8)
    together = generate_batch(model, prompts, seed=5, **settings)
    assert generate_batch(model, prompts[2:], seed=7, **settings) == together[2:]
