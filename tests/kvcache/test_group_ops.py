"""A step's prepared ops on the torch backend (`GroupOps`): the same results as the public
launchers, the step's layout worked out once for all layers, bad model tensors still named."""

from __future__ import annotations

import importlib

import pytest
import torch

from pagedkv.kernels import paged_attention, trace_backends
from pagedkv.kvcache import KVCacheConfig, KVCacheManager
from pagedkv.kvcache.paged_cache import PagedKVCache

HEADS, KV_HEADS, DIM, BS = 4, 2, 8, 4


def decode_step(lengths=(3, 14, 9, 30), *, layers=2, valid_pads=False):
    """A manager holding sequences of `lengths` tokens (random K/V), and an open decode step of
    one new token each (with `valid_pads`, the rows' prompts had a pad stored at position 1)."""
    cfg = KVCacheConfig(
        num_layers=layers, num_kv_heads=KV_HEADS, head_dim=DIM, block_size=BS, num_blocks=64
    )
    mgr = KVCacheManager(cfg)
    gen = torch.Generator().manual_seed(0)
    ids = [f"s{i}" for i in range(len(lengths))]
    for s in ids:
        mgr.allocate(s)
    valid = None
    if valid_pads:
        valid = [[j != 1 for j in range(n)] for n in lengths]
    with mgr.step(ids, list(lengths), valid=valid) as step:
        for layer in range(layers):
            k = torch.randn(sum(lengths), KV_HEADS, DIM, generator=gen)
            step.write(layer, k, torch.randn(k.shape, generator=gen))
    return mgr, ids, gen


@pytest.mark.parametrize("valid_pads", [False, True], ids=["plain", "stored-pads"])
def test_prepared_decode_equals_the_launchers(valid_pads):
    mgr, ids, gen = decode_step(valid_pads=valid_pads)
    with mgr.step(ids, 1) as step:
        written = []
        for layer in range(2):
            k = torch.randn(len(ids), KV_HEADS, DIM, generator=gen)
            step.write(layer, k, -k)
            written.append(k)
            q = torch.randn(len(ids), HEADS, DIM, generator=gen)
            out = step.attend(layer, q, scale=0.3)
            cache = mgr.cache
            expected = paged_attention(
                q, cache.key_cache(layer), cache.value_cache(layer), step.block_tables,
                step.seq_lens, scale=0.3,
                slot_valid=cache.slot_valid[0] if cache.has_holes[0] else None,
            )  # fmt: skip
            assert torch.equal(out, expected)
        last = torch.cumsum(step.seq_lens, 0) - 1  # each row's new token, packed
        for layer, k in enumerate(written):
            key, value = mgr.cache.gather(layer, step.block_tables, step.seq_lens)
            assert torch.equal(key[last], k) and torch.equal(value[last], -k)


def test_a_decode_step_is_planned_once_for_all_layers(monkeypatch):
    mgr, ids, gen = decode_step(layers=3)
    calls = {"plan": 0, "slots": 0}
    plan, slots = PagedKVCache.plan_decode, PagedKVCache.slot_index

    def count(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    monkeypatch.setattr(PagedKVCache, "plan_decode", count("plan", plan))
    monkeypatch.setattr(PagedKVCache, "slot_index", count("slots", slots))
    with trace_backends() as ops, mgr.step(ids, 1) as step:
        for layer in range(3):
            k = torch.randn(len(ids), KV_HEADS, DIM, generator=gen)
            step.write(layer, k, k)
            q = torch.randn(len(ids), HEADS, DIM, generator=gen)
            step.attend(layer, q, scale=0.3, causal=True, sinks=None, sliding_window=None)
    assert calls == {"plan": 1, "slots": 1}
    # each layer's ops still show in a trace
    assert ops == [("write_kv", "torch"), ("paged_attention", "torch")] * 3


@pytest.mark.parametrize(
    "what, make, match",
    [
        pytest.param(
            "write", lambda n: torch.zeros(n, KV_HEADS + 1, DIM), r"shape \[4, 3, 8\]", id="heads"
        ),
        pytest.param(
            "write",
            lambda n: torch.zeros(n + 1, KV_HEADS, DIM),
            r"slot_mapping has shape \[4\], expected \[5\]",
            id="tokens",
        ),
        pytest.param(
            "write",
            lambda n: torch.zeros(n, KV_HEADS, DIM, dtype=torch.float64),
            "dtype float64",
            id="dtype",
        ),
        pytest.param(
            "attend", lambda n: torch.zeros(n, 3, DIM), r"multiple of kv heads", id="q-heads"
        ),
        pytest.param(
            "attend", lambda n: torch.zeros(n + 2, HEADS, DIM), "one query per sequence", id="rows"
        ),
        pytest.param(
            "attend",
            lambda n: torch.zeros(n, HEADS, DIM - 1),
            r"key_cache has shape \[64, 4, 2, 8\], expected \[\*, \*, \*, 7\]",
            id="q-dim",
        ),
    ],
)
def test_bad_model_tensors_through_a_step_are_named(what, make, match):
    """The prepared path takes only what it expects; anything else reaches the launcher, whose
    ValueError names it, and the pool is unchanged."""
    mgr, ids, _ = decode_step()
    before = mgr.cache.pool.clone()
    bad = make(len(ids))
    with pytest.raises(ValueError, match=match), mgr.step(ids, 1) as step:
        if what == "write":
            step.write(0, bad, bad)
        else:
            step.attend(0, bad, scale=1.0)
    assert step.state == "aborted"
    assert torch.equal(mgr.cache.pool, before)


def test_a_step_layer_out_of_range_is_named():
    mgr, ids, _ = decode_step()
    with pytest.raises(ValueError, match="layer=-1"), mgr.step(ids, 1) as step:
        kv = torch.zeros(len(ids), KV_HEADS, DIM)
        step.write(-1, kv, kv)


def test_other_attention_arguments_go_through_the_launcher():
    """Sinks (not prepared) and a bad softcap take the launcher's path and checks."""
    mgr, ids, gen = decode_step()
    with mgr.step(ids, 1) as step:
        kv = torch.randn(len(ids), KV_HEADS, DIM, generator=gen)
        step.write(0, kv, kv)
        q = torch.randn(len(ids), HEADS, DIM, generator=gen)
        with_sinks = step.attend(0, q, scale=0.3, sinks=torch.full((HEADS,), -30.0))
        torch.testing.assert_close(with_sinks, step.attend(0, q, scale=0.3))
        with pytest.raises(ValueError, match="softcap"):
            step.attend(0, q, scale=0.3, softcap=-1.0)
        with pytest.raises(ValueError, match="sinks"):
            step.attend(0, q, scale=0.3, sinks=torch.zeros(HEADS + 1))


def test_step_gather_hands_the_host_total_to_gather_kv(monkeypatch):
    """A step knows its key count on the host, so its gather never makes gather_kv sum the
    lengths on the device (a device->host sync per layer on CUDA); same K/V as without it."""
    mgr, ids, gen = decode_step()
    paged_cache = importlib.import_module("pagedkv.kvcache.paged_cache")
    seen = []
    real = paged_cache.gather_kv

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_tokens"))
        return real(*args, **kwargs)

    monkeypatch.setattr(paged_cache, "gather_kv", spy)
    with mgr.step(ids, 1) as step:
        for layer in range(2):
            step.write(layer, *torch.randn(2, len(ids), KV_HEADS, DIM, generator=gen))
        key, value = step.gather(1)
        expected = real(
            mgr.cache.key_cache(1), mgr.cache.value_cache(1), step.block_tables, step.seq_lens
        )
    assert seen == [3 + 14 + 9 + 30 + 4]
    assert torch.equal(key, expected[0]) and torch.equal(value, expected[1])
