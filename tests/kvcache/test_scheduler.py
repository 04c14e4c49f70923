"""The continuous-batching `Scheduler` against a fake model whose tokens spell out its cache.

The fake model stores, for every token, K = 0 and V = (token, token x (position % 7 + 1),
position, 1), and attends with zero queries: each query's output is the plain mean of the V
it sees (every earlier token in a full-attention layer, the last `window` in a sliding one).
Times the number of keys it should see, that is the sums of those four columns, exact
integers in float32 at these sizes; the next token is a hash of them. So any wrong block a
step reads (after a preemption by swap or by recompute, a prefix-cache hit, a chunk of a
prompt, a cancel) changes the tokens, and `continuation`, which computes the same sums
straight from a request's token list, is the oracle every request's output must match.

`SchedulerMachine` runs random requests (some sharing prompt stems, so prefixes hit), steps,
aborted steps, cancels and bad input through one scheduler, on pools small enough that
requests are preempted, and checks the scheduler's queues against the manager after every
rule; the plain tests below pin down the policies one at a time.
"""

from __future__ import annotations

import math
import re

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pagedkv.kvcache import KVCacheConfig, KVCacheManager
from pagedkv.kvcache.scheduler import RequestStatus, Scheduler

VOCAB = 50  # token ids 0..49: the sums below stay exact in float32
HEAD_DIM = 4
WINDOW = 8  # the sliding layer of the hybrid layout
STEMS = ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4], [7] * 12, [2, 7, 1, 8] * 4)
MAX_PROMPT = 40
MAX_NEW = 20
LIVE = (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.SWAPPED)


# ---- the fake model and its oracle ---------------------------------------------------------
def values(token_ids: list[int], positions: list[int]) -> torch.Tensor:
    """V of each token, `[n, 1, HEAD_DIM]`: (token, token x (position % 7 + 1), position, 1)."""
    t = torch.tensor(token_ids, dtype=torch.float32)
    p = torch.tensor(positions, dtype=torch.float32)
    return torch.stack([t, t * (p % 7 + 1), p, torch.ones_like(t)], -1)[:, None, :]


def next_token(sums: list[list[int]]) -> int:
    """The next token from each layer's four column sums over the keys its query sees."""
    weights = (1, 3, 5, 11)
    h = sum((layer + 1) * w * s for layer, row in enumerate(sums) for w, s in zip(weights, row))
    return h % VOCAB


def oracle_next(tokens: list[int], windows: tuple[int | None, ...]) -> int:
    """The fake model's next token after `tokens`, computed from the tokens alone."""
    n = len(tokens)
    sums = []
    for window in windows:
        lo = 0 if window is None else max(0, n - window)
        seen = range(lo, n)
        sums.append(
            [
                sum(tokens[p] for p in seen),
                sum(tokens[p] * (p % 7 + 1) for p in seen),
                sum(seen),
                len(seen),
            ]
        )
    return next_token(sums)


def continuation(prompt, max_new_tokens, eos, windows) -> list[int]:
    """What a request must generate: the oracle's tokens up to a stop token or the limit."""
    tokens, out = list(prompt), []
    while len(out) < max_new_tokens:
        out.append(oracle_next(tokens, windows))
        tokens.append(out[-1])
        if out[-1] in eos:
            break
    return out


def forward(scheduled, windows: tuple[int | None, ...], layers: int | None = None) -> list[int]:
    """Run the fake model over a scheduled step (its first `layers` layers, all by default);
    returns the next token of each sample row."""
    step = scheduled.step
    positions = scheduled.flat_positions()
    v = values(scheduled.flat_token_ids(), positions)
    zeros = torch.zeros_like(v)
    last = torch.tensor(scheduled.logits_indices, dtype=torch.long)
    at = torch.tensor([positions[i] for i in scheduled.logits_indices], dtype=torch.float32)
    sums = []
    for layer, window in enumerate(windows[:layers]):
        step.write(layer, zeros, v)
        mean = step.attend(layer, zeros, scale=1.0)[last, 0]  # [samples, HEAD_DIM]
        seen = at + 1 if window is None else (at + 1).clamp(max=window)
        sums.append(torch.round(mean * seen[:, None]).long().tolist())
    return [next_token([layer[i] for layer in sums]) for i in range(len(scheduled.sample_rows))]


def run_step(sched: Scheduler, windows) -> list:
    """One step: schedule, the fake forward, finish_step; returns finish_step's events."""
    scheduled = sched.schedule()
    assert scheduled is not None, f"live requests but nothing scheduled: {sched!r}"
    return sched.finish_step(scheduled, forward(scheduled, windows))


def drain(sched: Scheduler, windows, max_steps: int = 5000) -> int:
    """Step until no request is live; returns the number of steps."""
    for n in range(max_steps):
        if not sched.has_unfinished:
            return n
        run_step(sched, windows)
    raise AssertionError(f"not drained after {max_steps} steps: {sched!r}")


def seq_id(sched: Scheduler, request_id) -> tuple:
    return ("pagedkv.request", sched._uid, request_id)


def make_scheduler(
    *,
    windows=(None,),
    block_size=4,
    num_blocks=16,
    num_cpu_blocks=0,
    prefix=True,
    **kwargs,
) -> Scheduler:
    cfg = KVCacheConfig(
        num_layers=len(windows),
        num_kv_heads=1,
        head_dim=HEAD_DIM,
        block_size=block_size,
        num_blocks=num_blocks,
        num_cpu_blocks=num_cpu_blocks,
        layer_windows=windows,
        enable_prefix_caching=prefix,
    )
    return Scheduler(KVCacheManager(cfg), **kwargs)


def test_the_fake_model_reads_its_tokens_from_the_cache():
    """Through the cache, the fake model gives the oracle's tokens (which are not one token
    over and over); one wrong value in the cache changes the next token."""
    windows = (None, 5)
    prompt = [4, 9, 0, 49, 17, 3, 3]
    sched = make_scheduler(windows=windows, block_size=2, num_blocks=40)
    request = sched.add("a", prompt, max_new_tokens=12)
    drain(sched, windows)
    expected = continuation(prompt, 12, (), windows)
    assert request.output == expected and len(set(expected)) > 3

    sched = make_scheduler(windows=windows, block_size=2, num_blocks=40)
    request = sched.add("a", prompt, max_new_tokens=2)
    run_step(sched, windows)
    assert request.output == expected[:1]
    block = sched.manager.get_blocks(seq_id(sched, "a"), 0).block_ids[0]
    sched.manager.cache.value_cache(0)[block, 0, 0, 0] += 1  # position 0 holds token 5, not 4
    run_step(sched, windows)
    assert request.output[1] != expected[1]


# ---- the state machine ---------------------------------------------------------------------
LAYOUTS = {"full": (None,), "full2": (None, None), "hybrid": (None, WINDOW)}


@st.composite
def setups(draw, preemption):
    """A pool small enough that requests get preempted (the largest request fits it alone,
    unless `pool_tokens` is below what it needs: then it is refused at `add`)."""
    block_size = draw(st.sampled_from([2, 4]))
    layout = draw(st.sampled_from(sorted(LAYOUTS)))
    windows = LAYOUTS[layout]
    pool_tokens = draw(st.sampled_from([40, 48, 64]))
    num_blocks = pool_tokens // block_size
    if windows[-1] is not None:
        # A sliding group never decides whether a request fits (the scheduler's bound: its
        # window and a step's new tokens beside it), but is tight enough to preempt.
        floor = 2 * (math.ceil(WINDOW / block_size) + 1)
        num_blocks = (num_blocks, floor + draw(st.integers(0, 4)))
    cpu = {"swap": [4, 12, 40], "recompute": [0, 12], None: [0, 6, 40]}[preemption]
    return {
        "windows": windows,
        "block_size": block_size,
        "num_blocks": num_blocks,
        "num_cpu_blocks": draw(st.sampled_from(cpu)),
        "prefix": draw(st.booleans()),
        "max_num_seqs": draw(st.sampled_from([2, 4, 8, 1])),
        "max_num_batched_tokens": draw(st.sampled_from([3, 8, 16, 64])),
        "preemption": preemption,
    }


class SchedulerMachine(RuleBasedStateMachine):
    """One scheduler on a drawn pool; the model here is what every request must generate
    (`expected`) and every request object ever added (`added`: the scheduler's own, whose
    status and progress the invariants check against the manager)."""

    PREEMPTION: str | None = None  # the scheduler's `preemption` (each subclass one mode)

    def __init__(self):
        super().__init__()
        self.sched: Scheduler | None = None
        self.expected: dict = {}  # request id -> the oracle's whole output
        self.added: dict = {}  # request id -> Request, every one ever added
        self.next_id = 0

    @initialize(data=st.data())
    def start(self, data):
        setup = data.draw(setups(self.PREEMPTION), label="setup")
        self.windows = setup["windows"]
        self.sched = make_scheduler(**setup)
        self.mgr = self.sched.manager
        self.cfg = self.mgr.config

    # ---- helpers ------------------------------------------------------------------------------
    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        """Whether the pool holds the request alone (the full-attention group decides)."""
        return math.ceil((prompt_len + max_new_tokens - 1) / self.cfg.block_size) <= (
            self.cfg.group_blocks(0)
        )

    def live(self) -> list:
        return [r for r in self.added.values() if r.status in LIVE]

    def snapshot(self, blocks=True):
        """What a rejected call must leave alone (`blocks`: the pools' free blocks too)."""
        return (
            [(r.request_id, r.status, r.num_computed, list(r.output)) for r in self.live()],
            [r.request_id for r in self.sched.requests()],
            [a.num_free_blocks for a in self.mgr.allocators] if blocks else None,
            sorted(map(repr, self.mgr)),
            sorted(map(repr, self.mgr.swapped_seq_ids)),
            (self.sched.num_waiting, self.sched.num_running, self.sched.num_swapped),
        )

    def new_id(self):
        self.next_id += 1
        return self.next_id if self.next_id % 3 else f"req-{self.next_id}"

    def schedule_checked(self):
        """`schedule`, and every promise about the step it plans."""
        before = {
            r.request_id: (r.status, r.num_tokens - r.num_computed) for r in self.sched.requests()
        }
        scheduled = self.sched.schedule()
        assert scheduled is not None
        sched = self.sched
        rows = len(scheduled.requests)
        assert 0 < rows <= sched.max_num_seqs
        assert 0 < scheduled.total_tokens <= sched.max_num_batched_tokens
        assert len({id(r) for r in scheduled.requests}) == rows, "a request twice in a step"
        assert scheduled.step.seq_ids == tuple(
            seq_id(sched, r.request_id) for r in scheduled.requests
        )
        assert scheduled.step.state == "open"
        samples, end = [], 0
        for i, (r, n, ids, pos) in enumerate(
            zip(scheduled.requests, scheduled.num_tokens, scheduled.token_ids, scheduled.positions)
        ):
            assert r.status == RequestStatus.RUNNING
            assert n >= 1 and pos == r.num_computed and pos + n <= r.num_tokens
            assert list(ids) == r.tokens(pos, pos + n)
            end += n
            if pos + n == r.num_tokens:
                samples.append((i, end - 1))
        assert list(zip(scheduled.sample_rows, scheduled.logits_indices)) == samples
        # Decodes first, then chunks of running prompts, then admissions; each by arrival.
        kinds = []
        for r in scheduled.requests:
            status, left = before[r.request_id]
            if status == RequestStatus.WAITING:
                kinds.append((2, r.arrival))
            else:
                kinds.append((0 if left == 1 else 1, r.arrival))
        assert kinds == sorted(kinds), f"rows out of order (kind, arrival): {kinds}"
        # No decode is left out while the budget has room for it.
        decodes = sum(1 for k, _ in kinds if k == 0)
        for r in sched.requests():
            was = before[r.request_id]
            if r.status == RequestStatus.RUNNING and was == (RequestStatus.RUNNING, 1):
                assert r in scheduled.requests or decodes == sched.max_num_batched_tokens
        return scheduled

    def finish_checked(self, scheduled, tokens):
        events = self.sched.finish_step(scheduled, tokens)
        assert scheduled.step.state == "committed"
        assert [e[0] for e in events] == [scheduled.requests[i] for i in scheduled.sample_rows]
        for (r, new, finished), t in zip(events, tokens):
            assert new == [t] and r.output[-1] == t
            assert finished == (r.status == RequestStatus.FINISHED)
            if finished:
                assert r.finish_reason == ("stop" if t in r.eos_token_ids else "length")
                assert r.finish_reason == "stop" or len(r.output) == r.max_new_tokens
                assert seq_id(self.sched, r.request_id) not in self.mgr
        return events

    # ---- rules --------------------------------------------------------------------------------
    def request(self, data):
        """Draw a request: a prompt (often a shared stem and a tail, so prefixes hit),
        a token limit and, sometimes, stop tokens (one of them on the oracle's own path)."""
        stem = data.draw(st.sampled_from([None, *STEMS]))
        n = data.draw(st.integers(1, MAX_PROMPT))
        tail = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
        prompt = ([] if stem is None else stem[: data.draw(st.integers(0, len(stem)))]) + tail
        prompt = prompt[:MAX_PROMPT]
        max_new = data.draw(st.integers(1, MAX_NEW))
        eos = set()
        if data.draw(st.booleans()):
            free_run = continuation(prompt, MAX_NEW, (), self.windows)
            eos = {free_run[data.draw(st.integers(0, MAX_NEW - 1))]}
            eos.add(data.draw(st.integers(0, VOCAB - 1)))
        return prompt, max_new, eos

    @precondition(lambda self: self.sched is not None)
    @rule(data=st.data(), count=st.integers(1, 4))
    def add(self, data, count):
        for _ in range(count):
            prompt, max_new, eos = self.request(data)
            rid = self.new_id()
            if not self.fits(len(prompt), max_new):
                before = self.snapshot()
                with pytest.raises(ValueError, match=re.escape(repr(rid))):
                    self.sched.add(rid, prompt, max_new, eos)
                assert self.snapshot() == before
                continue
            request = self.sched.add(rid, prompt, max_new_tokens=max_new, eos_token_ids=eos)
            assert request.status == RequestStatus.WAITING and request.output == []
            self.added[rid] = request
            self.expected[rid] = continuation(prompt, max_new, eos, self.windows)

    @precondition(lambda self: self.sched is not None)
    @rule(
        data=st.data(),
        kind=st.sampled_from(
            ["empty", "token", "zero", "negative", "float", "str", "bool", "dup", "long", "unknown"]
        ),
    )
    def bad_input(self, data, kind):
        """A bad request, or a cancel of an unknown (or finished) one: ValueError naming the
        request, and nothing changes."""
        if kind == "dup" and not self.live():
            kind = "zero"
        prompt, max_new = [1, 2, 3], 4
        if kind == "dup":
            rid = data.draw(st.sampled_from(self.live())).request_id
        elif kind == "unknown":
            done = [r.request_id for r in self.added.values() if r.done]
            rid = data.draw(st.sampled_from([*done, "nobody", 10**6]))
        else:
            rid = self.new_id()
        if kind == "empty":
            prompt = []
        elif kind == "token":
            prompt = [1, 2.5]
        elif kind == "long":
            prompt, max_new = [5] * (self.cfg.max_tokens + 1), 1
        else:
            bad = {"zero": 0, "negative": -2, "float": 1.5, "str": "3", "bool": True}
            max_new = bad.get(kind, max_new)
        before = self.snapshot()
        with pytest.raises(ValueError, match=re.escape(repr(rid))):
            if kind == "unknown":
                self.sched.cancel(rid)
            else:
                self.sched.add(rid, prompt, max_new)
        assert self.snapshot() == before

    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished)
    @rule(data=st.data(), steps=st.integers(1, 6))
    def step(self, data, steps):
        """A few steps; inside one, perhaps a bad finish_step, a cancel of a request the step
        does not compute (allowed) and one of a request it does (refused)."""
        for _ in range(steps):
            if not self.sched.has_unfinished:
                return
            scheduled = self.schedule_checked()
            if data.draw(st.integers(0, 3)) == 0:
                self.meddle(data, scheduled)
            self.finish_checked(scheduled, forward(scheduled, self.windows))

    def meddle(self, data, scheduled):
        with pytest.raises(RuntimeError, match="still open"):
            self.sched.schedule()
        inside = [r for r in self.live() if r in scheduled.requests]
        outside = [r for r in self.live() if r not in scheduled.requests]
        with pytest.raises(ValueError, match="open"):
            self.sched.cancel(data.draw(st.sampled_from(inside)).request_id)
        if outside and data.draw(st.booleans()):
            self.cancel_checked(data.draw(st.sampled_from(outside)))
        tokens = forward(scheduled, self.windows)
        with pytest.raises(ValueError, match="next tokens"):
            self.sched.finish_step(scheduled, [*tokens, 0])
        assert scheduled.step.state == "open"

    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished)
    @rule(layers=st.integers(0, 2))
    def aborted_step(self, layers):
        """A forward that fails after `layers` layers: the step is undone. The admissions and
        preemptions `schedule` made stay (an admitted request holds its sequence, a preempted
        one stays out), and so do the prefix-cache entries the step's new blocks evicted;
        without either, nothing changed and the same step is planned again."""
        before, evictions = self.snapshot(), self.mgr.stats.evictions
        scheduled = self.schedule_checked()
        planned = self.snapshot(blocks=False)
        rows = [
            (r.request_id, p, n)
            for r, p, n in zip(scheduled.requests, scheduled.positions, scheduled.num_tokens)
        ]
        forward(scheduled, self.windows, layers)
        self.sched.abort_step(scheduled)
        assert scheduled.step.state == "aborted"
        assert self.snapshot(blocks=False) == planned
        # No request admitted or preempted, no cached prefix lost:
        unmoved = planned[:2] == before[:2] and self.mgr.stats.evictions == evictions
        if unmoved:
            assert self.snapshot() == before
        again = self.schedule_checked()
        if unmoved:
            replanned = [
                (r.request_id, p, n)
                for r, p, n in zip(again.requests, again.positions, again.num_tokens)
            ]
            assert replanned == rows, f"planned {rows}, then after the abort {replanned}"
        self.finish_checked(again, forward(again, self.windows))

    def cancel_checked(self, request):
        sid = seq_id(self.sched, request.request_id)
        assert self.sched.cancel(request.request_id) is request
        assert request.status == RequestStatus.CANCELLED
        assert request.finish_reason == "cancelled"
        assert sid not in self.mgr
        assert request not in self.sched.requests()

    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished)
    @rule(data=st.data())
    def cancel(self, data):
        self.cancel_checked(data.draw(st.sampled_from(self.live())))

    # ---- invariants ---------------------------------------------------------------------------
    @invariant()
    def queues_agree_with_the_manager(self):
        if self.sched is None:
            return
        sched, mgr = self.sched, self.mgr
        mgr.check_invariants()
        live = self.live()
        assert sched.requests() == sorted(live, key=lambda r: r.arrival)
        assert sched.has_unfinished == bool(live)
        by = {s: [r for r in live if r.status == s] for s in LIVE}
        assert sched.num_waiting == len(by[RequestStatus.WAITING])
        assert sched.num_running == len(by[RequestStatus.RUNNING]) <= sched.max_num_seqs
        assert sched.num_swapped == len(by[RequestStatus.SWAPPED])
        held = {seq_id(sched, r.request_id) for r in live if r.status != RequestStatus.WAITING}
        assert set(mgr) == held, "the manager holds sequences no running request owns"
        assert set(mgr.swapped_seq_ids) == {
            seq_id(sched, r.request_id) for r in by[RequestStatus.SWAPPED]
        }
        for r in by[RequestStatus.RUNNING] + by[RequestStatus.SWAPPED]:
            assert mgr.seq_len(seq_id(sched, r.request_id)) == r.num_computed
            assert r.num_tokens - r.num_computed >= 1
        for r in by[RequestStatus.WAITING]:
            assert r.num_computed == 0
        preempted = sum(r.num_preemptions for r in self.added.values())
        assert preempted == sched.num_preemptions >= sched.num_swaps
        if not live:
            assert mgr.num_used_blocks == 0

    @invariant()
    def outputs_follow_the_oracle(self):
        for rid, r in self.added.items():
            expected = self.expected[rid]
            assert r.output == expected[: len(r.output)], (
                f"request {rid!r} ({r.status.value}, {r.num_preemptions} preemptions): "
                f"generated {r.output}, the oracle says {expected}"
            )
            if r.status == RequestStatus.FINISHED:
                assert r.output == expected
            if r.done:
                assert seq_id(self.sched, rid) not in self.mgr

    def teardown(self):
        """Drain: every live request runs to the oracle's whole output, no block stays used."""
        if self.sched is None or self.sched._open is not None:
            return  # (a failing rule left its step open: its error is the report)
        for _ in range(5000):
            if not self.sched.has_unfinished:
                break
            scheduled = self.schedule_checked()
            self.finish_checked(scheduled, forward(scheduled, self.windows))
        assert not self.sched.has_unfinished, f"not drained in 5000 steps: {self.sched!r}"
        for rid, r in self.added.items():
            if r.status != RequestStatus.CANCELLED:
                assert r.status == RequestStatus.FINISHED
                assert r.output == self.expected[rid], f"request {rid!r}"
        self.mgr.check_invariants()
        assert self.mgr.num_used_blocks == 0 and not list(self.mgr)


def _machine(preemption, name):
    """The machine in one preemption mode, with 1/10 of the loaded profile's examples, 25 at
    least (a rule here runs whole forward steps, and the teardown drains every request)."""
    machine = type(name, (SchedulerMachine,), {"PREEMPTION": preemption})
    machine.TestCase.settings = settings(
        max_examples=max(25, settings().max_examples // 10),
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    return machine.TestCase


TestSchedulerSwapOrRecompute = _machine(None, "DefaultMachine")
TestSchedulerRecompute = _machine("recompute", "RecomputeMachine")
TestSchedulerSwap = _machine("swap", "SwapMachine")


# ---- one policy at a time ------------------------------------------------------------------
def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (12 + 2 * i,), generator=g).tolist() for i in range(n)]


def run_all(windows, requests, **kwargs) -> tuple[Scheduler, dict]:
    """Run `requests` ((prompt, max_new_tokens) each) to completion; returns the scheduler
    and each request's output."""
    sched = make_scheduler(windows=windows, **kwargs)
    for i, (prompt, max_new) in enumerate(requests):
        sched.add(f"r{i}", prompt, max_new_tokens=max_new)
    added = list(sched.requests())
    drain(sched, windows)
    assert all(r.status == RequestStatus.FINISHED for r in added)
    sched.manager.check_invariants()
    assert sched.manager.num_used_blocks == 0 and not list(sched.manager)
    return sched, {r.request_id: r.output for r in added}


@pytest.mark.parametrize(
    "windows, num_blocks, tight_cpu",
    [
        pytest.param((None,), 16, 5, id="full-16blocks"),
        pytest.param((None, None), 14, 6, id="full2-14blocks"),
        pytest.param((None, WINDOW), (14, 6), 6, id="hybrid-14+6blocks"),
    ],
)
def test_a_small_pool_preempts_and_every_mode_gives_the_same_tokens(windows, num_blocks, tight_cpu):
    requests = [(p, 16) for p in prompts(6)]  # prompts of 12 to 22 tokens, then 16 more
    expected = {f"r{i}": continuation(p, n, (), windows) for i, (p, n) in enumerate(requests)}
    small = {"block_size": 4, "num_blocks": num_blocks, "max_num_batched_tokens": 32}

    big, out = run_all(windows, requests, block_size=4, num_blocks=128)
    assert big.num_preemptions == 0
    assert out == expected

    recompute, out = run_all(windows, requests, preemption="recompute", **small)
    assert recompute.num_preemptions > 0 and recompute.num_swaps == 0
    assert out == expected

    swap, out = run_all(windows, requests, preemption="swap", num_cpu_blocks=64, **small)
    assert swap.num_swaps > 0 and swap.num_swaps == swap.num_preemptions
    assert out == expected
    assert swap.manager.stats.num_swapped_seqs == 0

    # A swap space too small for every victim: those it cannot hold are recomputed.
    tight, out = run_all(windows, requests, preemption="swap", num_cpu_blocks=tight_cpu, **small)
    assert 0 < tight.num_swaps < tight.num_preemptions
    assert out == expected


@pytest.mark.parametrize("decoding", [0, 2], ids=["alone", "beside-2-decodes"])
def test_chunked_prefill_decodes_first(decoding):
    """A 30-token prompt, 8 tokens a step: 4 steps before its first token alone; beside
    requests that decode, each step gives them their token first and the prompt the rest."""
    windows = (None,)
    sched = make_scheduler(block_size=4, num_blocks=64, max_num_batched_tokens=8)
    for i in range(decoding):
        sched.add(f"d{i}", [i + 1], max_new_tokens=20)
    if decoding:  # one-token prompts: decoding after one step
        run_step(sched, windows)
    prompt = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    long = sched.add("long", prompt, max_new_tokens=3)
    chunk = 8 - decoding
    steps = 0
    while not long.output:
        scheduled = sched.schedule()
        steps += 1
        ids = [r.request_id for r in scheduled.requests]
        assert ids == [f"d{i}" for i in range(decoding)] + ["long"]
        assert scheduled.num_tokens == (1,) * decoding + (min(chunk, 30 - long.num_computed),)
        assert scheduled.positions[-1] == long.num_computed == (steps - 1) * chunk
        assert scheduled.total_tokens <= 8
        last_chunk = long.num_computed + scheduled.num_tokens[-1] == 30
        assert scheduled.sample_rows == tuple(range(decoding)) + ((decoding,) if last_chunk else ())
        sched.finish_step(scheduled, forward(scheduled, windows))
    assert steps == math.ceil(30 / chunk) == (4 if decoding == 0 else 5)
    drain(sched, windows)
    assert long.output == continuation(prompt, 3, (), windows)


@pytest.mark.parametrize(
    "windows, prefix, budget",
    [
        pytest.param((None,), True, 64, id="full"),
        pytest.param((None,), False, 64, id="full-no-prefix-caching"),
        # A sliding group keeps a long step's last window only, so the stem is prefilled in
        # steps short enough to store all of it.
        pytest.param((None, WINDOW), True, 4, id="hybrid-chunks-of-4"),
    ],
)
def test_a_shared_stem_is_not_computed_again(windows, prefix, budget):
    sched = make_scheduler(
        windows=windows,
        block_size=4,
        num_blocks=32 if len(windows) == 1 else (32, 12),
        prefix=prefix,
        max_num_seqs=1,
        max_num_batched_tokens=budget,
    )
    stem = prompts(1, seed=3)[0] + [7, 7, 7, 7]  # 16 tokens: four full blocks
    first = sched.add("first", [*stem, 1, 2], max_new_tokens=4)
    drain(sched, windows)
    hits = sched.manager.stats.prefix_hits
    second = sched.add("second", [*stem, 9], max_new_tokens=5)
    scheduled = sched.schedule()
    assert scheduled.requests == (second,)
    cached = 16 if prefix else 0
    assert second.num_computed == scheduled.positions[0] == cached
    assert scheduled.num_tokens == (min(17 - cached, budget),)
    assert sched.manager.stats.prefix_hits - hits == cached
    sched.finish_step(scheduled, forward(scheduled, windows))
    drain(sched, windows)
    assert first.output == continuation([*stem, 1, 2], 4, (), windows)
    assert second.output == continuation([*stem, 9], 5, (), windows)


@pytest.mark.parametrize("where", ["running", "swapped", "waiting"])
def test_cancel_frees_the_blocks_at_once(where):
    """Cancelling gives back what the request holds at once (its device blocks, or its CPU
    blocks when swapped out); the others run on to the oracle's tokens."""
    windows = (None,)
    sched = make_scheduler(block_size=4, num_blocks=4, num_cpu_blocks=8, prefix=False)
    mgr = sched.manager
    old = sched.add("old", [1], max_new_tokens=8)
    new = sched.add("new", [1, 1, 1], max_new_tokens=8)
    run_step(sched, windows)
    if where != "running":  # the pool fills at 8 tokens each: "new" is swapped out
        while new.status != RequestStatus.SWAPPED:
            run_step(sched, windows)
    late = sched.add("late", [2, 3], max_new_tokens=2, eos_token_ids=[0])
    victim = late if where == "waiting" else new
    assert victim.status == RequestStatus(where)
    held = math.ceil(victim.num_computed / 4) if where == "running" else 0
    used, swapped = mgr.num_used_blocks, mgr.stats.num_swapped_seqs
    sched.cancel(victim.request_id)
    assert victim.status == RequestStatus.CANCELLED and victim.finish_reason == "cancelled"
    assert seq_id(sched, victim.request_id) not in mgr
    assert mgr.num_used_blocks == used - held
    assert mgr.stats.num_swapped_seqs == swapped - (where == "swapped")
    mgr.check_invariants()
    with pytest.raises(ValueError, match=repr(victim.request_id)):
        sched.cancel(victim.request_id)
    drain(sched, windows)
    for r in (old, new, late):
        if r is not victim:
            assert r.output == continuation(r.prompt, r.max_new_tokens, {0}, windows)
    assert mgr.num_used_blocks == 0 and not list(mgr)


def test_an_open_step_refuses_a_second_schedule_and_a_wrong_token_count():
    windows = (None,)
    sched = make_scheduler()
    sched.add("a", [1, 2, 3], max_new_tokens=2)
    sched.add("b", [4, 5], max_new_tokens=2)
    scheduled = sched.schedule()
    with pytest.raises(RuntimeError, match="still open"):
        sched.schedule()
    with pytest.raises(ValueError, match="expected 2 next tokens"):
        sched.finish_step(scheduled, [1])
    assert scheduled.step.state == "open"
    assert [r.output for r in scheduled.requests] == [[], []]
    with pytest.raises(ValueError, match="open"):
        sched.cancel("a")
    sched.abort_step(scheduled)
    assert scheduled.step.state == "aborted"
    with pytest.raises(ValueError, match="not the scheduler's open step"):
        sched.finish_step(scheduled, [1, 2])
    again = sched.schedule()
    assert again.positions == scheduled.positions and again.num_tokens == scheduled.num_tokens
    sched.finish_step(again, forward(again, windows))
    drain(sched, windows)


def test_free_all_aborts_the_open_step_and_cancels_everything():
    windows = (None,)
    sched = make_scheduler(num_cpu_blocks=8)
    requests = [sched.add(i, p, max_new_tokens=4) for i, p in enumerate(prompts(3))]
    run_step(sched, windows)
    scheduled = sched.schedule()
    sched.free_all()
    assert scheduled.step.state == "aborted"
    assert all(r.status == RequestStatus.CANCELLED for r in requests)
    assert not sched.has_unfinished and sched.schedule() is None
    sched.manager.check_invariants()
    assert sched.manager.num_used_blocks == 0 and not list(sched.manager)


def test_a_swapped_request_comes_back_only_when_it_can_run():
    windows = (None,)
    sched = make_scheduler(
        block_size=4, num_blocks=4, num_cpu_blocks=16, prefix=False, preemption="swap"
    )
    mgr = sched.manager
    sched.add("a", [1], max_new_tokens=8)
    b = sched.add("b", [1, 1, 1], max_new_tokens=8)
    bounced = []
    while sched.has_unfinished:
        was_swapped, swapped_in = b.status == RequestStatus.SWAPPED, mgr.stats.swapped_in_blocks
        scheduled = sched.schedule()
        back_in = mgr.stats.swapped_in_blocks > swapped_in
        if was_swapped and b.status == RequestStatus.SWAPPED and back_in:
            bounced.append(b.num_computed)
        sched.finish_step(scheduled, forward(scheduled, windows))
    assert b.output == continuation([1, 1, 1], 8, (), windows)
    assert bounced == [], f"b was swapped in and out again at length {bounced}"


@pytest.mark.parametrize("eos", [2, "12", [1.7], ["a"]], ids=["int", "str", "float", "letter"])
def test_bad_stop_tokens_raise_a_value_error_naming_the_request(eos):
    sched = make_scheduler()
    with pytest.raises(ValueError, match="'x'"):
        sched.add("x", [1, 2], max_new_tokens=2, eos_token_ids=eos)
    assert not sched.has_unfinished


def test_a_request_waiting_for_blocks_is_looked_up_in_the_prefix_cache_once():
    """Admission asks `cached_prefix`, which takes nothing: the prefix-cache stats count each
    admitted prompt once, however many steps it waited for room."""
    windows = (None,)
    sched = make_scheduler(block_size=4, num_blocks=5)
    a = sched.add("a", list(range(1, 13)), max_new_tokens=8)  # 3 blocks, growing to 5
    b = sched.add("b", list(range(20, 32)), max_new_tokens=8)  # 3 more: waits for a
    run_step(sched, windows)
    waited = 0
    while a.status == RequestStatus.RUNNING:
        assert b.status == RequestStatus.WAITING
        run_step(sched, windows)
        waited += 1
    drain(sched, windows)
    assert waited >= 5 and sched.num_preemptions == 0
    assert sched.manager.stats.prefix_queries == len(a.prompt) + len(b.prompt)
    assert b.output == continuation(list(b.prompt), 8, (), windows)
