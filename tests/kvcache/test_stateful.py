"""Random sequences of manager operations, checked against a plain model after every step.

Every token's K/V is a function of (token id, position, layer), so whatever a sequence reads
back — written by itself, shared through fork or beam reorder, or found in the prefix cache —
must equal that function of the tokens the model says the sequence holds. Forward steps are
committed, or aborted at random points (before any write, after some layers, by an error or a
`KeyboardInterrupt` inside the `with` block), and an aborted step must leave nothing changed.
"""

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedkv.kvcache import KVCacheConfig, KVCacheManager, OutOfBlocksError

BASE = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
token = st.integers(0, 30)
PAD = 100  # the model holds a pad (a token stored invalid) as its token + PAD
LAYERS = 2


class _Failure(Exception):
    pass


def kv_of(tokens: list[int], start: int, layer: int):
    pos = torch.arange(start, start + len(tokens), dtype=torch.float32)
    val = torch.tensor(tokens, dtype=torch.float32) * 64 + pos + layer * 0.5
    k = val[:, None, None].expand(len(tokens), 1, 2).contiguous()
    return k, -k


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cfg = KVCacheConfig(
            num_layers=LAYERS,
            num_kv_heads=1,
            head_dim=2,
            block_size=2,
            num_blocks=14,
            num_cpu_blocks=6,
        )
        self.mgr = KVCacheManager(self.cfg)
        self.tokens: dict[int, list[int]] = {}  # model: what each sequence holds
        self.swapped: set[int] = set()
        self.next_id = 0

    # ---- helpers ----------------------------------------------------------------------------
    def resident(self):
        return sorted(s for s in self.tokens if s not in self.swapped)

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def snapshot(self):
        ids = self.resident()
        return (
            self.mgr.num_free_blocks,
            self.mgr.block_tables(ids).tolist() if ids else [],
            self.mgr.seq_lens(ids).tolist() if ids else [],
            [self.mgr.token_ids(s) for s in ids],
            sorted(self.mgr.seq_ids, key=str),
            sorted(self.mgr.swapped_seq_ids),
        )

    def cached_keys(self):
        return {b.block_hash for b in self.mgr.allocator.blocks if b.block_hash is not None}

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
        }
        return ids, counts, new, kwargs

    def write_step(self, step, ids, counts, new, layers=LAYERS):
        """What a forward writes: each row's new tokens at the end of its query window."""
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

    def commit_model(self, ids, new, forks):
        for i, s in enumerate(ids):
            self.tokens[s] = self.tokens[s] + new[i]
            for child in (forks or [[]] * len(ids))[i]:
                self.tokens[child] = list(self.tokens[s])

    # ---- rules ------------------------------------------------------------------------------
    @rule(cut=st.integers(1, len(BASE)), tail=st.lists(token, max_size=3), with_ids=st.booleans())
    def allocate(self, cut, tail, with_ids):
        prompt = BASE[:cut] + tail
        seq = self.new_id()
        cached = self.mgr.allocate(seq, prompt)
        assert cached % self.cfg.block_size == 0 and cached < len(prompt)
        self.tokens[seq] = prompt[:cached]
        rest = prompt[cached:]
        before = self.snapshot()
        try:
            step = self.mgr.step([seq], len(rest), token_ids=[rest] if with_ids else None)
        except OutOfBlocksError:
            assert self.snapshot() == before
            self.mgr.free(seq)  # a caller gives up on the prompt it declared
            del self.tokens[seq]
            return
        with step:
            self.write_step(step, [seq], [len(rest)], [rest])
        self.tokens[seq] = prompt

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
            self.write_step(step, ids, counts, new)
        assert step.state == "committed"
        self.commit_model(ids, new, kwargs["forks"])

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
            del self.tokens[other]
        else:
            extra = data.draw(st.lists(token, min_size=1, max_size=2))
            try:
                with self.mgr.step([other], len(extra), token_ids=[extra]) as inner:
                    self.write_step(inner, [other], [len(extra)], [extra])
                self.tokens[other] = self.tokens[other] + extra
            except OutOfBlocksError:
                pass
        self.write_step(step, ids, counts, new)
        if commit:
            step.commit()
            self.commit_model(ids, new, kwargs["forks"])
        else:
            step.abort()

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.resident()))
        child = self.new_id()
        self.mgr.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: len(self.resident()) >= 2)
    @rule(data=st.data())
    def reorder(self, data):
        ids = self.resident()
        group = data.draw(st.lists(st.sampled_from(ids), min_size=2, max_size=4, unique=True))
        src = data.draw(
            st.lists(st.integers(0, len(group) - 1), min_size=len(group), max_size=len(group))
        )
        self.mgr.reorder(group, src)
        old = [self.tokens[s] for s in group]
        for s, j in zip(group, src):
            self.tokens[s] = list(old[j])

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(self.resident()))
        n = data.draw(st.integers(0, len(self.tokens[seq])))
        self.mgr.truncate(seq, n)
        self.tokens[seq] = self.tokens[seq][:n]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.mgr.free(seq)
        del self.tokens[seq]
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
        for seq in self.resident():
            toks = self.tokens[seq]
            assert self.mgr.seq_len(seq) == len(toks)
            known = self.mgr.token_ids(seq)
            n = min(len(known), len(toks))
            assert known[:n] == toks[:n], f"seq {seq}: the manager knows ids {known}, holds {toks}"
            if not toks:
                continue
            tables, lens = self.mgr.block_tables([seq]), self.mgr.seq_lens([seq])
            pos = torch.arange(len(toks))
            valid = self.mgr.cache.slot_valid[
                tables[0, pos // self.cfg.block_size].long(), pos % self.cfg.block_size
            ]
            expected = [t < PAD for t in toks]
            if self.mgr.cache.has_holes:
                assert valid.tolist() == expected, f"seq {seq}: slot validity differs"
            else:
                assert all(expected)
            for layer in range(LAYERS):
                k, v = self.mgr.cache.gather(layer, tables, lens)
                ek, ev = kv_of(toks, 0, layer)
                assert torch.equal(k, ek), f"seq {seq} layer {layer}: keys differ"
                assert torch.equal(v, ev)

    @invariant()
    def every_cached_block_holds_the_tokens_its_hash_names(self):
        # K in layer 0 is token * 64 + position (positions stay below 64 here), so a block's
        # contents spell out which tokens it holds, at which positions.
        bs = self.cfg.block_size
        hashed = [b for b in self.mgr.allocator.blocks if b.block_hash is not None]
        if not hashed:
            return
        ids = torch.tensor([b.block_id for b in hashed])
        keys = self.mgr.cache.key_cache(0)[ids][:, :, 0, 0]
        for block, k in zip(hashed, keys.tolist()):
            tokens, pos = [int(x) // 64 for x in k], [int(x) % 64 for x in k]
            assert tuple(tokens) == block.block_hash.token_ids, (
                f"block {block.block_id} holds tokens {tokens}, registered as "
                f"{block.block_hash.token_ids}"
            )
            assert pos[0] % bs == 0 and pos == list(range(pos[0], pos[0] + bs))


# max_examples comes from the loaded profile (tests/conftest.py).
ManagerMachine.TestCase.settings = settings(
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestManagerStateful = ManagerMachine.TestCase
