"""Random sequences of manager operations, checked against a plain model after every step.

Every token's K/V is a function of (token id, position, layer), so whatever a sequence reads
back — written by itself, shared through fork or beam reorder, or found in the prefix cache —
must equal that function of the tokens the model says the sequence holds. Forward steps are
committed, or aborted at random points (before any write, after some layers, by an error or a
`KeyboardInterrupt` inside the `with` block), and an aborted step must leave nothing changed.

The machine runs on three layouts: every layer full attention, a hybrid (one full layer, two
sliding windows) and every layer sliding. A sliding group must hold its window and no more:
after each operation a sequence holds the K/V of its positions from `stored_from` on, which
lies between the start of the block where the window of its last step's first query begins
(everything wholly before was released) and that window's start (so a crop back into that
step still works), and its attention over the step equals attention over the model's tokens.
"""

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedkv.kvcache import KVCacheConfig, KVCacheManager, OutOfBlocksError
from pagedkv.kvcache import groups as groups_module

BASE = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
token = st.integers(0, 30)
PAD = 100  # the model holds a pad (a token stored invalid) as its token + PAD
LAYERS = 3
SPAN = 256  # K = token * SPAN + position: positions stay below it
CROP_STEP = 3  # steps of more tokens are "long" here (a sliding group skips their early tokens)
SCALE = 1e-4  # keeps the scores of K values in the thousands in a sane range


class _Failure(Exception):
    pass


def kv_of(tokens: list[int], start: int, layer: int):
    pos = torch.arange(start, start + len(tokens), dtype=torch.float32)
    val = torch.tensor(tokens, dtype=torch.float32) * SPAN + pos + layer * 0.5
    k = val[:, None, None].expand(len(tokens), 1, 2).contiguous()
    return k, -k


class ManagerMachine(RuleBasedStateMachine):
    WINDOWS: tuple = (None, None, None)
    NUM_BLOCKS: int | tuple = 14

    def __init__(self):
        super().__init__()
        self._crop_step = groups_module.CROP_STEP
        groups_module.CROP_STEP = CROP_STEP
        self.cfg = KVCacheConfig(
            num_layers=LAYERS,
            num_kv_heads=1,
            head_dim=2,
            block_size=2,
            num_blocks=self.NUM_BLOCKS,
            num_cpu_blocks=6,
            layer_windows=self.WINDOWS,
        )
        self.mgr = KVCacheManager(self.cfg)
        self.tokens: dict[int, list[int]] = {}  # model: what each sequence holds
        # model: per sequence, the first position of its last step (the end of a long one):
        # a crop back to it or later must work, and a sliding group releases what no query
        # from it on sees
        self.floor: dict[int, int] = {}
        self.swapped: set[int] = set()
        self.next_id = 0

    def teardown(self):
        groups_module.CROP_STEP = self._crop_step

    # ---- helpers ----------------------------------------------------------------------------
    def resident(self):
        return sorted(s for s in self.tokens if s not in self.swapped)

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def snapshot(self):
        ids = self.resident()
        groups = range(len(self.cfg.groups))
        return (
            [a.num_free_blocks for a in self.mgr.allocators],
            [self.mgr.block_tables(ids, g).tolist() if ids else [] for g in groups],
            [[self.mgr.get_blocks(s, g).stored_from for s in ids] for g in groups],
            self.mgr.seq_lens(ids).tolist() if ids else [],
            [self.mgr.token_ids(s) for s in ids],
            sorted(self.mgr.seq_ids, key=str),
            sorted(self.mgr.swapped_seq_ids),
        )

    def cached_keys(self):
        return {
            (g, b.block_hash)
            for g, a in enumerate(self.mgr.allocators)
            for b in a.blocks
            if b.block_hash is not None
        }

    def long(self, n: int) -> bool:
        return n > CROP_STEP

    def plan(self, data, ids=None):
        """Draw a step: sequences, new tokens each (0 allowed, some stored as invalid pads),
        ids passed or not, forks, query windows."""
        if ids is None:
            ids = data.draw(
                st.lists(st.sampled_from(self.resident()), min_size=1, max_size=3, unique=True)
            )
        counts = [data.draw(st.integers(0, 3)) for _ in ids]
        new = [data.draw(st.lists(token, min_size=n, max_size=n)) for n in counts]
        valid = None
        if data.draw(st.integers(0, 3)) == 0:
            valid = [data.draw(st.lists(st.booleans(), min_size=n, max_size=n)) for n in counts]
            new = [[t if v else t + PAD for t, v in zip(r, f)] for r, f in zip(new, valid)]
        forks = data.draw(st.lists(st.integers(0, 2), min_size=len(ids), max_size=len(ids)))
        forks = [[self.new_id() for _ in range(f)] for f in forks] if any(forks) else None
        window = data.draw(st.sampled_from([None, max(counts) + data.draw(st.integers(0, 1))]))
        kwargs = {
            "token_ids": new if data.draw(st.booleans()) else None,
            "valid": valid,
            "forks": forks,
            "num_queries": window or None,
            "keep": data.draw(st.sampled_from([None, None, 0, 1, 2, 5])),
        }
        return ids, counts, new, kwargs

    def write_step(self, step, ids, counts, new, layers=LAYERS, attend=False):
        """What a forward writes: each row's new tokens at the end of its query window. With
        `attend`, each layer's attention through the step is checked against the model."""
        queries = step.slot_mapping.shape[0]
        starts = [len(self.tokens[s]) for s in ids]
        for layer in range(layers):
            k = torch.zeros(queries, 1, 2)
            at = 0
            for seq_id in step.seq_ids:
                q = 1 if step.query_start_loc is None else None
                if q is None:
                    row = step.seq_ids.index(seq_id)
                    q = int(step.query_start_loc[row + 1] - step.query_start_loc[row])
                if seq_id in ids:
                    i = ids.index(seq_id)
                    if counts[i]:
                        rk, _ = kv_of(new[i], starts[i], layer)
                        k[at + q - counts[i] : at + q] = rk
                at += q
            step.write(layer, k, -k)
            if attend:
                self.check_attention(step, ids, new, layer)

    def check_attention(self, step, ids, new, layer):
        """The step's attention at `layer` equals softmax attention over the model's tokens
        (each query at its position, within the layer's window, pads hidden)."""
        window = self.cfg.layer_windows[layer]
        parent = {}
        for i, seq in enumerate(ids):
            parent[seq] = i
        rows = list(step.seq_ids)
        held, starts = {}, {}
        for i, seq in enumerate(ids):
            held[seq] = self.tokens[seq] + new[i]
            starts[seq] = len(self.tokens[seq])
        for seq in rows:  # forks: a copy of their parent, the planned sequence before them
            if seq not in held:
                src = max(
                    (s for s in ids if step.seq_ids.index(s) < step.seq_ids.index(seq)),
                    key=step.seq_ids.index,
                )
                held[seq], starts[seq] = held[src], starts[src]
        lens = step.seq_lens.tolist()
        qsl = step.query_start_loc
        q_lens = [1] * len(rows) if qsl is None else (qsl[1:] - qsl[:-1]).tolist()
        total = sum(q_lens)
        query = torch.linspace(0.5, 1.5, total)[:, None, None].expand(total, 1, 2).contiguous()
        out = step.attend(layer, query, scale=SCALE)
        expected = torch.zeros(total, 1, 2)
        at = 0
        for seq, n, q in zip(rows, lens, q_lens, strict=True):
            toks = held[seq]
            assert len(toks) == n
            k, v = kv_of(toks, 0, layer)
            for j in range(q):
                p = n - q + j
                if window is not None and p < starts[seq]:
                    # a pad query of a padded batch: a sliding group need not hold its window
                    expected[at + j] = out[at + j]
                    continue
                lo = 0 if window is None else max(0, p - window + 1)
                keep = [lo <= i <= p and toks[i] < PAD for i in range(n)]
                if any(keep):
                    mask = torch.tensor(keep)
                    scores = (query[at + j, 0] * k[mask, 0]).sum(-1) * SCALE
                    expected[at + j, 0] = torch.softmax(scores, 0) @ v[mask, 0]
            at += q
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-2)

    def commit_model(self, ids, new, forks, keep=None):
        for i, s in enumerate(ids):
            n = len(new[i])
            self.tokens[s] = self.tokens[s] + new[i]
            back = (0 if self.long(n) else n) if keep is None else keep
            # a crop back to the end minus `back`, or to where an earlier step allowed
            self.floor[s] = max(len(self.tokens[s]) - back, self.floor[s])
            for child in (forks or [[]] * len(ids))[i]:
                self.tokens[child] = list(self.tokens[s])
                self.floor[child] = self.floor[s]

    # ---- rules ------------------------------------------------------------------------------
    @rule(cut=st.integers(1, len(BASE)), tail=st.lists(token, max_size=3), with_ids=st.booleans())
    def allocate(self, cut, tail, with_ids):
        prompt = BASE[:cut] + tail
        seq = self.new_id()
        cached = self.mgr.allocate(seq, prompt)
        assert cached % self.cfg.block_size == 0 and cached < len(prompt)
        self.tokens[seq] = prompt[:cached]
        self.floor[seq] = cached
        rest = prompt[cached:]
        before = self.snapshot()
        try:
            step = self.mgr.step([seq], len(rest), token_ids=[rest] if with_ids else None)
        except OutOfBlocksError:
            assert self.snapshot() == before
            self.mgr.free(seq)  # a caller gives up on the prompt it declared
            del self.tokens[seq], self.floor[seq]
            return
        with step:
            self.write_step(step, [seq], [len(rest)], [rest], attend=True)
        self.commit_model([seq], [rest], None)

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def step(self, data):
        ids, counts, new, kwargs = self.plan(data)
        before = self.snapshot()
        try:
            step = self.mgr.step(ids, counts, **kwargs)
        except OutOfBlocksError:
            assert self.snapshot() == before
            return
        with step:
            self.write_step(step, ids, counts, new, attend=data.draw(st.booleans()))
        assert step.state == "committed"
        self.commit_model(ids, new, kwargs["forks"], kwargs["keep"])

    @precondition(lambda self: self.resident())
    @rule(
        data=st.data(),
        how=st.sampled_from(["abort", "error", "interrupt"]),
        layers=st.integers(0, LAYERS),
    )
    def aborted_step(self, data, how, layers):
        """A forward that dies after writing `layers` layers: nothing may change (cached
        blocks the step's allocations evicted aside)."""
        ids, counts, new, kwargs = self.plan(data)
        before, cached = self.snapshot(), self.cached_keys()
        try:
            step = self.mgr.step(ids, counts, **kwargs)
        except OutOfBlocksError:
            assert self.snapshot() == before
            return
        error = {"error": _Failure, "interrupt": KeyboardInterrupt}.get(how)
        try:
            with step:
                self.write_step(step, ids, counts, new, layers)
                if error is None:
                    step.abort()
                else:
                    raise error
        except (_Failure, KeyboardInterrupt):
            pass
        assert step.state == "aborted"
        assert self.snapshot() == before
        assert self.cached_keys() <= cached

    @precondition(lambda self: len(self.resident()) >= 2)
    @rule(data=st.data(), commit=st.booleans())
    def step_around_other_work(self, data, commit):
        """While a step is open, other sequences are freed or stepped (they may share its
        blocks); then the step commits or aborts."""
        ids = data.draw(
            st.lists(st.sampled_from(self.resident()), min_size=1, max_size=2, unique=True)
        )
        others = [s for s in self.resident() if s not in ids]
        if not others:
            return
        ids, counts, new, kwargs = self.plan(data, ids)
        try:
            step = self.mgr.step(ids, counts, **kwargs)
        except OutOfBlocksError:
            return
        other = data.draw(st.sampled_from(others))
        if data.draw(st.booleans()):
            self.mgr.free(other)
            del self.tokens[other], self.floor[other]
        else:
            extra = data.draw(st.lists(token, min_size=1, max_size=2))
            try:
                with self.mgr.step([other], len(extra), token_ids=[extra]) as inner:
                    self.write_step(inner, [other], [len(extra)], [extra])
                self.commit_model([other], [extra], None)
            except OutOfBlocksError:
                pass
        self.write_step(step, ids, counts, new)
        if commit:
            step.commit()
            self.commit_model(ids, new, kwargs["forks"], kwargs["keep"])
        else:
            step.abort()

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.resident()))
        child = self.new_id()
        self.mgr.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.floor[child] = self.floor[parent]

    @precondition(lambda self: len(self.resident()) >= 2)
    @rule(data=st.data())
    def reorder(self, data):
        ids = self.resident()
        group = data.draw(st.lists(st.sampled_from(ids), min_size=2, max_size=4, unique=True))
        src = data.draw(
            st.lists(st.integers(0, len(group) - 1), min_size=len(group), max_size=len(group))
        )
        self.mgr.reorder(group, src)
        old = [(self.tokens[s], self.floor[s]) for s in group]
        for s, j in zip(group, src):
            self.tokens[s] = list(old[j][0])
            self.floor[s] = old[j][1]

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(self.resident()))
        n = data.draw(st.integers(0, len(self.tokens[seq])))
        before = self.snapshot()
        try:
            self.mgr.truncate(seq, n)
        except ValueError as exc:
            # Only a sliding window may refuse, and only a crop before the last step.
            assert n < self.floor[seq], f"truncate to {n} refused (floor {self.floor[seq]}): {exc}"
            assert "sliding window" in str(exc)
            assert self.snapshot() == before
            return
        self.tokens[seq] = self.tokens[seq][:n]
        self.floor[seq] = min(self.floor[seq], n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.mgr.free(seq)
        del self.tokens[seq], self.floor[seq]
        self.swapped.discard(seq)

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def swap_out(self, data):
        seq = data.draw(st.sampled_from(self.resident()))
        before = self.snapshot()
        try:
            self.mgr.swap_out(seq)
        except OutOfBlocksError:
            assert self.snapshot() == before
            return
        self.swapped.add(seq)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        seq = data.draw(st.sampled_from(sorted(self.swapped)))
        before = self.snapshot()
        try:
            self.mgr.swap_in(seq)
        except OutOfBlocksError:
            assert self.snapshot() == before
            return
        self.swapped.discard(seq)

    @rule()
    def reset_prefix_cache(self):
        self.mgr.reset_prefix_cache()

    # ---- invariants ---------------------------------------------------------------------------
    @invariant()
    def bookkeeping_is_consistent(self):
        # No block both free and owned, ref count = owners, free + used = total.
        self.mgr.check_invariants()
        assert set(self.mgr) == set(self.tokens)
        assert set(self.mgr.swapped_seq_ids) == self.swapped

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        bs = self.cfg.block_size
        for seq in self.resident():
            toks = self.tokens[seq]
            assert self.mgr.seq_len(seq) == len(toks)
            known = self.mgr.token_ids(seq)
            n = min(len(known), len(toks))
            assert known[:n] == toks[:n], f"seq {seq}: the manager knows ids {known}, holds {toks}"
            for g, group in enumerate(self.cfg.groups):
                blocks = self.mgr.get_blocks(seq, g)
                start = blocks.stored_from
                if group.window is None:
                    assert start == 0
                else:  # the window of the last step's first query, and no block before it
                    low = max(0, self.floor[seq] - group.window + 1)
                    assert low // bs * bs <= start <= low, (
                        f"seq {seq} group {g}: holds from {start}, window from {low}"
                    )
                table = blocks.block_ids
                assert table[: blocks.num_absent] == [-1] * blocks.num_absent
                assert blocks.num_absent == start // bs
                assert all(b >= 0 for b in table[blocks.num_absent :])
                if len(toks) <= start:
                    continue
                pos = torch.arange(start, len(toks))
                ids = torch.tensor(table, dtype=torch.long)[pos // bs]
                valid = self.mgr.cache.slot_valid[g][ids, pos % bs]
                expected = [t < PAD for t in toks[start:]]
                if self.mgr.cache.has_holes[g]:
                    assert valid.tolist() == expected, f"seq {seq}: slot validity differs"
                for layer in group.layers:
                    ek, ev = kv_of(toks, 0, layer)
                    k = self.mgr.cache.key_cache(layer)[ids, pos % bs]
                    v = self.mgr.cache.value_cache(layer)[ids, pos % bs]
                    assert torch.equal(k, ek[start:]), f"seq {seq} layer {layer}: keys differ"
                    assert torch.equal(v, ev[start:])
                if group.window is None and toks:  # the gather kernel reads the same
                    tables, lens = self.mgr.block_tables([seq], g), self.mgr.seq_lens([seq])
                    k, v = self.mgr.cache.gather(group.layers[0], tables, lens)
                    assert torch.equal(k, kv_of(toks, 0, group.layers[0])[0])

    @invariant()
    def every_cached_block_holds_the_tokens_its_hash_names(self):
        # K in the group's first layer is token * SPAN + position, so a block's contents spell
        # out which tokens it holds, at which positions.
        bs = self.cfg.block_size
        for g, allocator in enumerate(self.mgr.allocators):
            hashed = [b for b in allocator.blocks if b.block_hash is not None]
            if not hashed:
                continue
            ids = torch.tensor([b.block_id for b in hashed])
            layer = self.cfg.groups[g].layers[0]
            keys = self.mgr.cache.key_cache(layer)[ids][:, :, 0, 0] - layer * 0.5
            for block, k in zip(hashed, keys.tolist()):
                tokens, pos = [int(x) // SPAN for x in k], [int(x) % SPAN for x in k]
                assert tuple(tokens) == block.block_hash.token_ids, (
                    f"group {g} block {block.block_id} holds tokens {tokens}, registered as "
                    f"{block.block_hash.token_ids}"
                )
                assert pos[0] % bs == 0 and pos == list(range(pos[0], pos[0] + bs))


# max_examples comes from the loaded profile (tests/conftest.py).
class HybridMachine(ManagerMachine):
    """One full layer, two sliding windows (a block and a half, two and a half)."""

    WINDOWS = (None, 3, 5)
    NUM_BLOCKS = (14, 10, 12)


class SlidingMachine(ManagerMachine):
    """Every layer sliding (mistral style): sequences outgrow the pool's tokens."""

    WINDOWS = (4, 4, 4)
    NUM_BLOCKS = 12


_SETTINGS = settings(
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
for _machine in (ManagerMachine, HybridMachine, SlidingMachine):
    _machine.TestCase.settings = _SETTINGS
TestManagerStateful = ManagerMachine.TestCase
TestHybridStateful = HybridMachine.TestCase
TestSlidingStateful = SlidingMachine.TestCase
