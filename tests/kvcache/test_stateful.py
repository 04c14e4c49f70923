"""Random sequences of manager operations, checked against a plain model after every step.

Every token's K/V is a function of (token id, position, layer), so whatever a sequence reads
back — written by itself, shared through fork or beam reorder, or found in the prefix cache —
must equal that function of the tokens the model says the sequence holds.
"""

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedkv.kvcache import KVCacheConfig, KVCacheManager, OutOfBlocksError

BASE = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
token = st.integers(0, 30)


def kv_of(tokens: list[int], start: int, layer: int, heads: int, dim: int):
    pos = torch.arange(start, start + len(tokens), dtype=torch.float32)
    val = torch.tensor(tokens, dtype=torch.float32) * 64 + pos + layer * 0.5
    k = val[:, None, None].expand(len(tokens), heads, dim).contiguous()
    return k, -k


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cfg = KVCacheConfig(
            num_layers=2, num_kv_heads=1, head_dim=2, block_size=2, num_blocks=14, num_cpu_blocks=6
        )
        self.mgr = KVCacheManager(self.cfg)
        self.tokens: dict[int, list[int]] = {}  # model: what each sequence holds
        self.swapped: set[int] = set()
        self.next_id = 0

    # ---- helpers ----------------------------------------------------------------------------
    def resident(self):
        return sorted(s for s in self.tokens if s not in self.swapped)

    def write(self, seq_id: int, new: list[int], slots: torch.Tensor, start: int):
        for layer in range(self.cfg.num_layers):
            k, v = kv_of(new, start, layer, 1, 2)
            self.mgr.cache.write(layer, k, v, slots)

    def snapshot(self):
        ids = self.resident()
        return (
            self.mgr.num_free_blocks,
            self.mgr.block_tables(ids).tolist() if ids else [],
            self.mgr.seq_lens(ids).tolist() if ids else [],
            sorted(self.mgr.swapped_seq_ids),
        )

    # ---- rules ------------------------------------------------------------------------------
    @rule(cut=st.integers(1, len(BASE)), tail=st.lists(token, max_size=3), with_ids=st.booleans())
    def allocate(self, cut, tail, with_ids):
        prompt = BASE[:cut] + tail
        seq = self.next_id
        self.next_id += 1
        cached = self.mgr.allocate(seq, prompt)
        assert cached % self.cfg.block_size == 0 and cached < len(prompt)
        self.tokens[seq] = prompt[:cached]
        rest = prompt[cached:]
        before = self.snapshot()
        try:
            slots = self.mgr.append(seq, len(rest), token_ids=rest if with_ids else None)
        except OutOfBlocksError:
            assert self.snapshot() == before
            # A caller gives up on the prompt it declared (later appends would continue it).
            self.mgr.free(seq)
            del self.tokens[seq]
            return
        self.write(seq, rest, slots, cached)
        self.tokens[seq] = prompt

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), n=st.integers(1, 3), with_ids=st.booleans())
    def append(self, data, n, with_ids):
        ids = self.resident()
        chosen = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3, unique=True))
        new = [data.draw(st.lists(token, min_size=n, max_size=n)) for _ in chosen]
        starts = [len(self.tokens[s]) for s in chosen]
        before = self.snapshot()
        try:
            slots = self.mgr.append_batch(chosen, n, token_ids=new if with_ids else None)
        except OutOfBlocksError:
            assert self.snapshot() == before
            return
        for i, s in enumerate(chosen):
            self.write(s, new[i], slots[i * n : (i + 1) * n], starts[i])
            self.tokens[s] = self.tokens[s] + new[i]

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.resident()))
        child = self.next_id
        self.next_id += 1
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

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), n=st.integers(1, 5))
    def append_then_undo(self, data, n):
        # A caller reserves slots, fails before writing them, and gives them back.
        seq = data.draw(st.sampled_from(self.resident()))
        start = len(self.tokens[seq])
        before = self.snapshot()
        try:
            self.mgr.append(seq, n, token_ids=data.draw(st.lists(token, min_size=n, max_size=n)))
        except OutOfBlocksError:
            assert self.snapshot() == before
            return
        self.mgr.forget_unwritten(seq, start)
        self.mgr.truncate(seq, start)

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), n=st.integers(1, 5))
    def append_forget_then_write(self, data, n):
        # A forward reserves slots and fails before writing them; a later one writes them.
        seq = data.draw(st.sampled_from(self.resident()))
        start = len(self.tokens[seq])
        new = data.draw(st.lists(token, min_size=n, max_size=n))
        try:
            slots = self.mgr.append(seq, n, token_ids=new)
        except OutOfBlocksError:
            return
        self.mgr.forget_unwritten(seq, start)
        self.write(seq, new, slots, start)
        self.tokens[seq] = self.tokens[seq] + new

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def register(self, data):
        seq = data.draw(st.sampled_from(self.resident()))
        n = data.draw(st.integers(0, len(self.tokens[seq])))
        self.mgr.register_prefix(seq, self.tokens[seq][:n])

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
            if not toks:
                continue
            tables, lens = self.mgr.block_tables([seq]), self.mgr.seq_lens([seq])
            for layer in range(self.cfg.num_layers):
                k, v = self.mgr.cache.gather(layer, tables, lens)
                ek, ev = kv_of(toks, 0, layer, 1, 2)
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
        keys = self.mgr.cache.read_blocks([b.block_id for b in hashed])[:, 0, 0, :, 0, 0]
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
