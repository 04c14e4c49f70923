import pytest
import torch

from pagedkv.kvcache import KVCacheConfig, KVCacheManager


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The manager's tensors are tiny (see `one_torch_thread`)."""


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # The manager's bookkeeping is under test here, not the kernels (tests/kernels runs the
    # Triton interpreter): the torch backend keeps these tests fast.
    monkeypatch.setenv("PAGEDKV_BACKEND", "torch")


def make_manager(**overrides) -> KVCacheManager:
    fields = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 4, "num_blocks": 32}
    fields.update(overrides)
    return KVCacheManager(KVCacheConfig(**fields))


def fill(mgr: KVCacheManager, seq_id, slots: torch.Tensor, seed: int):
    """Write deterministic random K/V for `slots` into every layer; returns them per layer."""
    g = torch.Generator().manual_seed(seed)
    c = mgr.config
    written = []
    for layer in range(c.num_layers):
        k = torch.randn(len(slots), c.num_kv_heads, c.head_dim, generator=g).to(c.torch_dtype)
        v = torch.randn(len(slots), c.num_kv_heads, c.head_dim, generator=g).to(c.torch_dtype)
        mgr.cache.write(layer, k, v, slots)
        written.append((k, v))
    return written


def read(mgr: KVCacheManager, seq_id, layer: int):
    """The K/V a sequence holds in one layer, `[seq_len, Hkv, D]` each."""
    return mgr.cache.gather(layer, mgr.block_tables([seq_id]), mgr.seq_lens([seq_id]))
