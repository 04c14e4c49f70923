"""The continuous-batching sampler against transformers' logits processors, and its noise:
per-row determinism, batch independence, and the distribution it draws from."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pagedkv.integrations._sampling import (
    SamplingBatch,
    SamplingParams,
    _mix32,
    _uniform,
    _unit_float,
    filtered_logits,
    sample,
)


def _history(gen: torch.Generator, rows: int, width: int, vocab: int) -> torch.Tensor:
    """Random ids `[rows, width]`, each row a random length padded with -1, with duplicates."""
    ids = torch.randint(0, vocab, (rows, width), generator=gen)
    ids[:, 1] = ids[:, 0]
    lengths = torch.randint(2, width + 1, (rows,), generator=gen)
    return ids.masked_fill(torch.arange(width)[None, :] >= lengths[:, None], -1)


def _hf_processed(logits_row: torch.Tensor, p: SamplingParams, ids: torch.Tensor) -> torch.Tensor:
    """One row through the processors generate builds for `p`, in generate's order."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if p.do_sample:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(p.temperature)))
        if p.top_k != 0:
            procs.append(TopKLogitsWarper(top_k=p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=p.top_p))
    return procs(ids[ids >= 0][None, :], logits_row[None, :].clone())[0]


def _assert_same_filter(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


# --- greedy and the repetition penalty ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_greedy_rows_take_the_argmax(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 41, generator=gen).to(dtype)
    logits[2, [7, 30]] = 9.0  # a tie: the lowest index wins
    batch = SamplingBatch.of([SamplingParams()] * 6, "cpu")
    tokens = sample(logits, batch, history=None, counters=torch.arange(6))
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.float().argmax(-1))
    assert tokens[2] == 7


def test_repetition_penalty_counts_each_id_once():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    history = torch.tensor([[0, 0, 1, 1, 0, -1, -1]])
    batch = SamplingBatch.of([SamplingParams(repetition_penalty=2.0)], "cpu")
    out = filtered_logits(logits, batch, history)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))


@pytest.mark.parametrize(
    "rows,vocab,width",
    [pytest.param(8, 97, 30, id="B8-V97-L30"), pytest.param(5, 13, 40, id="B5-V13-L40-dense")],
)
def test_greedy_with_repetition_penalty_matches_transformers(rows, vocab, width):
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    history = _history(gen, rows, width, vocab)
    penalties = [1.0, 1.3, 0.7, 2.5, 1.05, 1.3, 3.0, 1.0][:rows]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    ours = filtered_logits(logits, SamplingBatch.of(params, "cpu"), history)
    tokens = sample(
        logits, SamplingBatch.of(params, "cpu"), history=history, counters=torch.zeros(rows).long()
    )
    for r, p in enumerate(params):
        ref = _hf_processed(logits[r], p, history[r])
        assert torch.equal(ours[r], ref), f"row {r}, penalty {p.repetition_penalty}"
        assert tokens[r] == ref.argmax()


# --- sampling rows: the filter against transformers' warpers ---


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_filtered_logits_match_transformers_warpers(ties):
    vocab = 50
    combos = itertools.product(
        [False, True],  # do_sample
        [0.5, 1.0, 1.7],  # temperature
        [0, 1, 5, vocab + 7],  # top_k
        [1.0, 0.8, 0.3, 1e-6, 1e-9],  # top_p; 1 - 1e-9 rounds to 1.0 in float32
        [1.0, 1.3],  # repetition_penalty
    )
    params = [
        SamplingParams(do_sample=s, temperature=t, top_k=k, top_p=p, repetition_penalty=r, seed=i)
        for i, (s, t, k, p, r) in enumerate(combos)
    ]
    gen = torch.Generator().manual_seed(1)
    if ties:  # few distinct values: ties at the top-k threshold and the top-p boundary
        logits = torch.randint(-3, 4, (len(params), vocab), generator=gen).float()
    else:
        logits = torch.randn(len(params), vocab, generator=gen) * 2
    history = _history(gen, len(params), 12, vocab)
    batch = SamplingBatch.of(params, "cpu")
    ours = filtered_logits(logits, batch, history)
    kept = torch.isfinite(ours).sum(-1)
    for r, p in enumerate(params):
        _assert_same_filter(ours[r], _hf_processed(logits[r], p, history[r]))
        if p.do_sample and p.top_p < 1e-5 and not ties:
            assert kept[r] == 1
    # Every row sampling from its filtered logits draws a token it kept.
    tokens = sample(logits, batch, history=history, counters=torch.arange(len(params)))
    assert torch.isfinite(ours.gather(1, tokens[:, None])).all()


def test_from_generation_config_filters_like_generate():
    """Stock generate's processed scores (`output_scores`) against ours on its raw logits."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    gen_config = GenerationConfig(
        do_sample=True, top_k=None, temperature=0.7, top_p=0.9, repetition_penalty=1.3
    )
    prompt = torch.randint(3, 96, (3, 7))
    with torch.no_grad():
        out = model.generate(
            prompt,
            generation_config=gen_config,
            max_new_tokens=4,
            pad_token_id=0,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    batch = SamplingBatch.of([SamplingParams.from_generation_config(gen_config, 0)] * 3, "cpu")
    for step, (raw, ref) in enumerate(zip(out.logits, out.scores)):
        history = out.sequences[:, : prompt.shape[1] + step]
        ours = filtered_logits(raw, batch, history)
        assert (torch.isfinite(ref).sum(-1) <= 50).all()  # generate's default top_k applied
        for r in range(3):
            _assert_same_filter(ours[r], ref[r])


# --- the noise: batch independence, determinism, distribution ---


def _mixed_params(gen: torch.Generator, rows: int) -> list[SamplingParams]:
    def pick(options):
        return options[int(torch.randint(len(options), (), generator=gen))]

    return [
        SamplingParams(
            do_sample=pick([False, True, True]),
            temperature=pick([0.6, 1.0, 1.5]),
            top_k=pick([0, 3, 20]),
            top_p=pick([1.0, 0.9, 0.5]),
            repetition_penalty=pick([1.0, 1.2]),
            seed=int(torch.randint(2**40, (), generator=gen)),
        )
        for _ in range(rows)
    ]


def test_rows_sample_the_same_alone_or_shuffled():
    rows, vocab, width = 10, 33, 16
    gen = torch.Generator().manual_seed(2)
    params = _mixed_params(gen, rows)
    batch = SamplingBatch.of(params, "cpu")
    history = _history(gen, rows, width, vocab)
    drawn_not_argmax = 0
    for step in range(16):
        logits = torch.randn(rows, vocab, generator=gen)
        if step % 2:  # ties, at the top-k threshold and the top-p boundary
            logits = logits.mul(2).round()
        counters = torch.randint(0, 1000, (rows,), generator=gen)
        tokens = sample(logits, batch, history=history, counters=counters)
        for r, p in enumerate(params):
            own = history[r : r + 1, : int((history[r] >= 0).sum())]  # its own width, no padding
            alone = sample(
                logits[r : r + 1],
                SamplingBatch.of([p], "cpu"),
                history=own if p.repetition_penalty != 1.0 else None,
                counters=counters[r : r + 1],
            )
            assert alone.item() == tokens[r].item(), f"step {step}, row {r}: {p}"
        perm = torch.randperm(rows, generator=gen)
        shuffled = sample(
            logits[perm],
            SamplingBatch.of([params[i] for i in perm], "cpu"),
            history=history[perm],
            counters=counters[perm],
        )
        assert torch.equal(shuffled, tokens[perm])
        drawn_not_argmax += int((tokens != logits.argmax(-1)).sum())
    assert drawn_not_argmax > 10  # the test exercised the noise, not just argmaxes


def test_same_seed_and_counter_give_the_same_token():
    vocab = 1000
    logits = torch.zeros(1, vocab).expand(64, vocab)  # uniform: the noise alone decides
    one_seed = SamplingBatch.of([SamplingParams(do_sample=True, seed=7)] * 64, "cpu")
    by_counter = sample(logits, one_seed, history=None, counters=torch.arange(64))
    again = sample(logits, one_seed, history=None, counters=torch.arange(64))
    assert torch.equal(by_counter, again)
    assert len(set(by_counter.tolist())) >= 55  # 64 draws of 1000: few repeats
    same_counter = sample(logits, one_seed, history=None, counters=torch.full((64,), 5))
    assert (same_counter == by_counter[5]).all()
    seeds = SamplingBatch.of([SamplingParams(do_sample=True, seed=s) for s in range(64)], "cpu")
    by_seed = sample(logits, seeds, history=None, counters=torch.full((64,), 5))
    assert len(set(by_seed.tolist())) >= 55
    # The high 32 bits of seed and counter take part too.
    high_seeds = [SamplingParams(do_sample=True, seed=s + 2**32) for s in range(64)]
    by_high_seed = sample(
        logits, SamplingBatch.of(high_seeds, "cpu"), history=None, counters=torch.full((64,), 5)
    )
    assert (by_high_seed != by_seed).sum() >= 55
    high_counters = sample(logits, one_seed, history=None, counters=torch.arange(64) + 2**32)
    assert (high_counters != by_counter).sum() >= 55


PROBS = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 17])
@pytest.mark.parametrize(
    "kwargs,expected",
    [
        pytest.param({}, PROBS, id="plain"),
        pytest.param({"temperature": 2.0}, PROBS.sqrt() / PROBS.sqrt().sum(), id="T2"),
        pytest.param({"top_k": 3}, torch.cat([PROBS[:3] / 0.65, torch.zeros(5)]), id="topk3"),
        # top_p 0.6 removes the ascending prefix of mass <= 0.4: all but the 3 largest
        pytest.param({"top_p": 0.6}, torch.cat([PROBS[:3] / 0.65, torch.zeros(5)]), id="topp.6"),
    ],
)
def test_empirical_frequencies_follow_softmax(seed, kwargs, expected):
    draws = 4000
    logits = PROBS.log().expand(draws, -1)
    batch = SamplingBatch.of([SamplingParams(do_sample=True, seed=seed, **kwargs)] * draws, "cpu")
    tokens = sample(logits, batch, history=None, counters=torch.arange(draws))
    freq = torch.bincount(tokens, minlength=8).double() / draws
    assert (freq[expected == 0] == 0).all(), freq  # filtered tokens never drawn
    # sd of a frequency is at most sqrt(0.25 / 4000) = 0.008; deterministic, so no flake
    assert (freq - expected.double()).abs().max() < 0.03, (freq, expected)


def test_uniform_noise_is_in_the_open_unit_interval_and_flat():
    seeds = torch.arange(16, dtype=torch.int64) * 2**35 + 3
    u = _uniform(seeds, torch.arange(16, dtype=torch.int64), 4096)
    assert u.dtype == torch.float64 and u.shape == (16, 4096)
    assert (u > 0).all() and (u < 1).all()
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    assert (counts - u.numel() / 16).abs().max() < 300  # 4096 expected, sd 62
    ones = torch.tensor([0xFFFFFFFF])
    assert _unit_float(ones, ones).item() == 1 - 2**-53
    assert _unit_float(ones * 0, ones * 0).item() == 2**-53


def test_mix32_is_lowbias32():
    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    words = [0, 1, 2**31 - 1, 2**31, 0xDEADBEEF, 0xFFFFFFFF, 12345678]
    assert _mix32(torch.tensor(words)).tolist() == [lowbias32(w) for w in words]


# --- parameters: generation configs and validation ---


def test_from_generation_config_reads_like_generate():
    sampled = GenerationConfig(do_sample=True, top_k=None, temperature=0.7, top_p=0.9)
    assert SamplingParams.from_generation_config(sampled, 5) == SamplingParams(
        do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.0, seed=5
    )
    greedy = GenerationConfig(top_k=5, temperature=0.0, top_p=0.5, repetition_penalty=1.2)
    assert SamplingParams.from_generation_config(greedy, 5) == SamplingParams(
        repetition_penalty=1.2, seed=5
    )
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    if defaults is not None:  # a config that leaves them all None gets generate's defaults
        unset = SamplingParams.from_generation_config(GenerationConfig(do_sample=True), 0)
        for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
            assert getattr(unset, name) == defaults()[name], name


def test_seed_none_draws_from_torch_global_rng():
    config = GenerationConfig(do_sample=True)
    torch.manual_seed(3)
    first = SamplingParams.from_generation_config(config, None).seed
    second = SamplingParams.from_generation_config(config, None).seed
    torch.manual_seed(3)
    assert SamplingParams.from_generation_config(config, None).seed == first
    assert first != second and 0 <= first < 2**63


BAD = [
    ("temperature", 0.0),
    ("temperature", -1.0),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.2),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.5),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_values_raise_naming_parameter_value_and_request(name, value):
    with pytest.raises(ValueError) as direct:
        SamplingParams(do_sample=True, **{name: value})
    assert name in str(direct.value) and repr(value) in str(direct.value)
    config = GenerationConfig(do_sample=True)
    seed = 0
    if name == "seed":
        seed = value
    else:
        setattr(config, name, value)
    with pytest.raises(ValueError) as from_config:
        SamplingParams.from_generation_config(config, seed, request="req-7")
    message = str(from_config.value)
    assert "'req-7'" in message and name in message and repr(value) in message


def test_greedy_ignores_sampling_values():
    assert SamplingParams(temperature=0.0).temperature == 0.0  # unused when not sampling
    config = GenerationConfig(do_sample=False, temperature=0.0, top_k=-1, top_p=2.0)
    assert SamplingParams.from_generation_config(config, 0) == SamplingParams()


def test_sample_rejects_mismatched_shapes():
    batch = SamplingBatch.of([SamplingParams(repetition_penalty=1.2)] * 2, "cpu")
    logits, counters = torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="history"):
        sample(logits, batch, history=None, counters=counters)
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(3, 5), batch, history=torch.zeros(3, 1).long(), counters=counters)
    with pytest.raises(ValueError, match="counters"):
        sample(logits, batch, history=torch.zeros(2, 1).long(), counters=torch.zeros(3))
