import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig

from pagedkv.kvcache import DeviceType, DType, KVCacheConfig


def test_sizes_follow_the_geometry():
    cfg = KVCacheConfig(
        num_layers=3, num_kv_heads=2, head_dim=64, block_size=16, num_blocks=10, dtype="float16"
    )
    assert cfg.dtype is DType.FLOAT16 and cfg.torch_dtype == torch.float16
    assert cfg.bytes_per_token == 2 * 3 * 2 * 64 * 2
    assert cfg.bytes_per_block == 16 * cfg.bytes_per_token
    assert cfg.total_bytes == 10 * cfg.bytes_per_block
    assert cfg.max_tokens == 160
    assert cfg.blocks_for_tokens(17) == 2


def test_memory_budget_derives_num_blocks():
    per_block = KVCacheConfig(
        num_layers=2, num_kv_heads=4, head_dim=32, num_blocks=1
    ).bytes_per_block
    cfg = KVCacheConfig(
        num_layers=2, num_kv_heads=4, head_dim=32, memory_budget_bytes=10 * per_block + 5
    )
    assert cfg.num_blocks == 10
    assert cfg.num_blocks_for_memory(3 * per_block) == 3


def test_config_is_frozen():
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=4)
    with pytest.raises(AttributeError):
        cfg.num_blocks = 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"num_layers": 0}, "num_layers=0", id="zero-layers"),
        pytest.param({"head_dim": -8}, "head_dim=-8", id="negative-head-dim"),
        pytest.param({"block_size": 12}, "block_size=12 must be a power of two", id="bs-not-pow2"),
        pytest.param({"block_size": 256}, "block_size=256 is too large", id="bs-too-large"),
        pytest.param({"num_blocks": 0}, "num_blocks=0", id="zero-blocks"),
        pytest.param({"num_blocks": None}, "exactly one of .* got none", id="no-size"),
        pytest.param({"memory_budget_bytes": 10}, "exactly one of", id="both-sizes"),
        pytest.param({"memory_fraction": 0.5}, "exactly one of", id="blocks-and-fraction"),
        pytest.param(
            {"num_blocks": None, "memory_fraction": 1.5}, "memory_fraction=1.5", id="fraction>1"
        ),
        pytest.param(
            {"num_blocks": None, "memory_fraction": True}, "memory_fraction=True", id="bool-frac"
        ),
        pytest.param({"device_index": -1}, "device_index=-1", id="negative-device-index"),
        pytest.param({"device_index": "0"}, "device_index='0'", id="str-device-index"),
        pytest.param({"dtype": "int8"}, "dtype 'int8' is not supported", id="bad-dtype"),
        pytest.param({"device": "tpu"}, "device 'tpu'", id="bad-device"),
        pytest.param({"num_cpu_blocks": -1}, "num_cpu_blocks=-1", id="negative-cpu-blocks"),
        pytest.param({"num_layers": True}, "num_layers=True", id="bool-is-not-int"),
    ],
)
def test_bad_values_name_the_field(kwargs, match):
    base = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "num_blocks": 4}
    with pytest.raises(ValueError, match=match):
        KVCacheConfig(**{**base, **kwargs})


def test_budget_smaller_than_a_block_is_refused():
    with pytest.raises(ValueError, match="holds no block"):
        KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, memory_budget_bytes=10)


def test_device_parsing():
    cfg = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=1, device="cuda:1")
    assert cfg.device is DeviceType.CUDA and cfg.device_index == 1
    assert cfg.torch_device == torch.device("cuda", 1)
    cpu = KVCacheConfig(
        num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=1, device=torch.device("cpu")
    )
    assert cpu.torch_device == torch.device("cpu")
    assert cfg.replace(device="cpu").torch_device == torch.device("cpu")


def test_dtype_aliases():
    assert DType.parse("bf16") is DType.BFLOAT16
    assert DType.parse(torch.float32) is DType.FLOAT32
    assert DType.parse("torch.float16") is DType.FLOAT16
    with pytest.raises(ValueError, match="float64"):
        DType.parse(torch.float64)


def test_from_model_config_gqa():
    hf = LlamaConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2
    )
    cfg = KVCacheConfig.from_model_config(hf, block_size=8, num_blocks=32)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (3, 2, 8)
    assert cfg.block_size == 8 and cfg.num_blocks == 32


def test_from_model_config_explicit_head_dim_and_dtype():
    hf = MistralConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        dtype=torch.bfloat16,
    )
    cfg = KVCacheConfig.from_model_config(hf)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (2, 1, 32)
    assert cfg.dtype is DType.BFLOAT16


GiB = 1 << 30


@pytest.mark.parametrize(
    "device, free, expected_bytes",
    [
        pytest.param("cpu", 16 * GiB, GiB, id="cpu-at-most-1GiB"),
        pytest.param("cpu", 2 * GiB, GiB // 2, id="cpu-a-quarter-of-available-RAM"),
        pytest.param("cuda", 10 * GiB, 5 * GiB, id="cuda-half-of-free"),
    ],
)
def test_the_default_pool_fits_the_device(monkeypatch, device, free, expected_bytes):
    import pagedkv.kvcache._memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda _device: free)
    hf = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32)
    cfg = KVCacheConfig.from_model_config(hf, device=device, dtype="bfloat16")
    assert cfg.num_blocks == expected_bytes // cfg.bytes_per_block  # 4 MiB blocks here
    tiny = KVCacheConfig.from_model_config(
        LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4), device=device
    )
    assert tiny.num_blocks == memory.MAX_DEFAULT_BLOCKS[device]  # bounded bookkeeping


def test_memory_fraction_sizes_by_free_memory(monkeypatch):
    import pagedkv.kvcache.config as config

    monkeypatch.setattr(config, "available_bytes", lambda _device: 1000 * 4096)
    cfg = KVCacheConfig(
        num_layers=2, num_kv_heads=2, head_dim=32, block_size=4, memory_fraction=0.25
    )
    assert cfg.bytes_per_block == 4096 and cfg.num_blocks == 250
    assert cfg.memory_fraction is None  # resolved: a copy keeps the pool's size
    assert cfg.replace(dtype="float16").num_blocks == 250
    assert cfg.replace(memory_budget_bytes=8192).num_blocks == 2


def test_from_model_config_gpt2_names():
    hf = GPT2Config(n_embd=48, n_layer=2, n_head=4)
    cfg = KVCacheConfig.from_model_config(hf, memory_budget_bytes=1 << 20)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 12)
    assert cfg.num_blocks == (1 << 20) // cfg.bytes_per_block


def test_from_model_config_rejects_unknown_override():
    with pytest.raises(ValueError, match="unknown KVCacheConfig field"):
        KVCacheConfig.from_model_config(LlamaConfig(), blocksize=8)


def test_a_pool_too_large_for_the_device_is_refused_before_allocating():
    from pagedkv.kvcache import KVCacheManager

    huge = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, num_blocks=10**10)
    with pytest.raises(ValueError, match=r"num_blocks=10000000000 needs .*TiB on cpu .* is free"):
        KVCacheManager(huge)
    tiny_blocks = KVCacheConfig(
        num_layers=1, num_kv_heads=1, head_dim=1, block_size=1, num_blocks=10**10
    )
    with pytest.raises(ValueError, match="per block"):  # the allocator's records alone
        KVCacheManager(tiny_blocks)


def test_falcon_kv_heads():
    from transformers import FalconConfig

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    # The new decoder architecture ignores multi_query and caches K/V broadcast to every query
    # head (transformers' FalconAttention), whatever num_kv_heads says.
    new = FalconConfig(**common, new_decoder_architecture=True, num_kv_heads=2)
    assert new.multi_query
    assert KVCacheConfig.from_model_config(new, num_blocks=4).num_kv_heads == 4
    mqa = FalconConfig(**common, multi_query=True)
    assert KVCacheConfig.from_model_config(mqa, num_blocks=4).num_kv_heads == 1
