"""Launchers reject bad arguments with a ValueError naming the actual and expected values."""

from __future__ import annotations

import pytest
import torch

from pagedkv.kernels import copy_blocks, gather_kv, paged_attention, write_kv


def cache(num_blocks=4, bs=8, hkv=2, d=64, dtype=torch.float16):
    return torch.zeros(num_blocks, bs, hkv, d, dtype=dtype)


def attention_args(**overrides):
    args = {
        "query": torch.zeros(3, 4, 64, dtype=torch.float16),
        "key_cache": cache(),
        "value_cache": cache(),
        "block_tables": torch.zeros(3, 2, dtype=torch.int32),
        "seq_lens": torch.ones(3, dtype=torch.int32),
        "scale": 0.125,
    }
    args.update(overrides)
    return args


ATTENTION_ERRORS = [
    pytest.param(
        {"query": torch.zeros(3, 4, 64, 1)},
        r"query has shape \[3, 4, 64, 1\], expected \[\*, \*, \*\]",
        id="query-ndim",
    ),
    pytest.param(
        {"query": torch.zeros(3, 4, 32, dtype=torch.float16)},
        r"key_cache has shape \[4, 8, 2, 64\], expected \[\*, \*, \*, 32\]",
        id="head-dim",
    ),
    pytest.param(
        {"query": torch.zeros(3, 4, 64, dtype=torch.int32)},
        "query has dtype int32",
        id="query-dtype",
    ),
    pytest.param(
        {"query": torch.zeros(3, 4, 64)},
        "key_cache dtype torch.float16 differs",
        id="query-cache-dtype",
    ),
    pytest.param(
        {"query": torch.zeros(3, 3, 64, dtype=torch.float16)},
        r"query heads \(3\) must be a multiple of kv heads \(2\)",
        id="gqa-ratio",
    ),
    pytest.param(
        {"value_cache": cache(num_blocks=5)},
        r"value_cache has shape \[5, 8, 2, 64\], expected \[4, 8, 2, 64\]",
        id="value-shape",
    ),
    pytest.param(
        {"block_tables": torch.zeros(3, 2)}, "block_tables has dtype float32", id="bt-dtype"
    ),
    pytest.param(
        {"seq_lens": torch.ones(2, dtype=torch.int32)},
        r"seq_lens has shape \[2\], expected \[3\]",
        id="seq-lens-len",
    ),
    pytest.param(
        {"seq_lens": torch.ones(6, dtype=torch.int32)[::2]},
        "seq_lens must be contiguous",
        id="seq-lens-stride",
    ),
    pytest.param(
        {
            "block_tables": torch.zeros(2, 2, dtype=torch.int32),
            "seq_lens": torch.ones(2, dtype=torch.int32),
        },
        "query has 3 tokens, block_tables 2 sequences",
        id="decode-T-ne-B",
    ),
    pytest.param(
        {"query_start_loc": torch.zeros(3, dtype=torch.int32)},
        r"query_start_loc has shape \[3\], expected \[4\]",
        id="qsl-len",
    ),
    pytest.param({"out": torch.zeros(3, 4, 64)}, "out has dtype float32", id="out-dtype"),
    pytest.param({"sliding_window": 0}, "sliding_window must be a positive int", id="window"),
    pytest.param(
        {"sliding_window": True},
        "sliding_window must be a positive int or None, got True",
        id="window-bool",
    ),
    pytest.param({"sliding_window": 4.0}, "got 4.0", id="window-float"),
    pytest.param({"softcap": -1.0}, "softcap must be > 0", id="softcap"),
    pytest.param({"softcap": True}, "softcap must be > 0 or None, got True", id="softcap-bool"),
    pytest.param(
        {"slot_valid": torch.ones(4, 7, dtype=torch.bool)},
        r"slot_valid has shape \[4, 7\], expected \[4, 8\]",
        id="slot-valid-shape",
    ),
    pytest.param(
        {"slot_valid": torch.ones(4 * 8, dtype=torch.bool)},
        r"slot_valid has shape \[32\], expected \[4, 8\]",
        id="slot-valid-flat",
    ),
    pytest.param(
        {"slot_valid": torch.ones(4, 8)},
        "slot_valid has dtype float32, expected one of bool, uint8",
        id="slot-valid-dtype",
    ),
    pytest.param(
        {"slot_valid": torch.ones(4, 8, dtype=torch.bool, device="meta")},
        "slot_valid is on meta, expected cpu",
        id="slot-valid-device",
    ),
    pytest.param(
        {"sinks": torch.zeros(3)}, r"sinks has shape \[3\], expected \[4\]", id="sinks-shape"
    ),
    pytest.param(
        {"sinks": torch.zeros(1, 4)},
        r"sinks has shape \[1, 4\], expected \[4\]",
        id="sinks-2d",
    ),
    pytest.param(
        {"sinks": torch.zeros(4, dtype=torch.int32)},
        "sinks has dtype int32, expected one of float16, bfloat16, float32, float64",
        id="sinks-dtype",
    ),
    pytest.param(
        {"sinks": torch.zeros(4, device="meta")},
        "sinks is on meta, expected cpu",
        id="sinks-device",
    ),
    pytest.param({"sinks": [0.0] * 4}, "sinks must be a torch.Tensor, got list", id="sinks-list"),
    pytest.param({"backend": "cuda"}, "unknown kernels backend", id="backend"),
    pytest.param({"config": {"block_n": 8}}, "block_n must be >= 16", id="config-block-n-small"),
    pytest.param({"config": {"block_n": 24}}, "block_n must be a power of 2, got 24", id="config"),
]


@pytest.mark.parametrize("overrides, match", ATTENTION_ERRORS)
def test_paged_attention_errors(overrides, match):
    args = attention_args(**overrides)
    with pytest.raises(ValueError, match=match):
        paged_attention(
            args.pop("query"),
            args.pop("key_cache"),
            args.pop("value_cache"),
            args.pop("block_tables"),
            args.pop("seq_lens"),
            **args,
        )


WRITE_ERRORS = [
    pytest.param(
        {"key": torch.zeros(3, 2, 32, dtype=torch.float16)},
        r"key has shape \[3, 2, 32\], expected \[\*, 2, 64\]",
        id="key-shape",
    ),
    pytest.param(
        {"value": torch.zeros(2, 2, 64, dtype=torch.float16)},
        r"value has shape \[2, 2, 64\], expected \[3, 2, 64\]",
        id="value-tokens",
    ),
    pytest.param(
        {"value": torch.zeros(3, 2, 64)},
        "value has dtype float32, expected one of float16",
        id="value-dtype",
    ),
    pytest.param(
        {"value_cache": cache(dtype=torch.bfloat16)},
        "value_cache has dtype bfloat16",
        id="cache-dtypes",
    ),
    pytest.param(
        {"slot_mapping": torch.zeros(3)}, "slot_mapping has dtype float32", id="slot-dtype"
    ),
    pytest.param(
        {"slot_mapping": torch.zeros(4, dtype=torch.int64)},
        r"slot_mapping has shape \[4\], expected \[3\]",
        id="slot-len",
    ),
    pytest.param(
        {"key_cache": cache()[..., 0]}, r"key_cache has shape \[4, 8, 2\]", id="cache-ndim"
    ),
]


@pytest.mark.parametrize("overrides, match", WRITE_ERRORS)
def test_write_kv_errors(overrides, match):
    args = {
        "key": torch.zeros(3, 2, 64, dtype=torch.float16),
        "value": torch.zeros(3, 2, 64, dtype=torch.float16),
        "key_cache": cache(),
        "value_cache": cache(),
        "slot_mapping": torch.zeros(3, dtype=torch.int64),
    }
    args.update(overrides)
    with pytest.raises(ValueError, match=match):
        write_kv(**args)


def test_copy_blocks_errors():
    layers = [cache(), cache()]
    mapping = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="got 2 key and 1 value caches"):
        copy_blocks(layers, layers[:1], mapping)
    with pytest.raises(ValueError, match="must be lists of tensors"):
        copy_blocks(layers[0], layers[0], mapping)
    with pytest.raises(ValueError, match=r"key_caches\[1\] has shape \[5, 8, 2, 64\]"):
        copy_blocks([cache(), cache(num_blocks=5)], layers, mapping)
    pool = torch.zeros(4, 2, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"key_caches\[1\] has strides"):
        copy_blocks([cache(), pool[:, 0]], layers, mapping)
    with pytest.raises(ValueError, match=r"block_mapping has shape \[2\], expected \[\*, 2\]"):
        copy_blocks(layers, layers, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="block_mapping has dtype float32"):
        copy_blocks(layers, layers, torch.zeros(1, 2))
    # every layer as one tensor [num_blocks, num_layers, block_size, Hkv, D]
    stacked = torch.zeros(4, 3, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"value_caches has shape \[4, 2, 8, 2, 64\], expected"):
        copy_blocks(stacked, stacked[:, :2], mapping)
    with pytest.raises(ValueError, match="value_caches has dtype float32, expected one of float16"):
        copy_blocks(stacked, stacked.float(), mapping)
    with pytest.raises(ValueError, match="value_caches must be a torch.Tensor, got list"):
        copy_blocks(stacked, [stacked[:, 0]], mapping)
    with pytest.raises(ValueError, match=r"block_mapping\[0, 1\] = 4 is out of range"):
        copy_blocks(stacked, stacked, torch.tensor([[0, 4]]))


def test_gather_kv_errors():
    with pytest.raises(ValueError, match=r"seq_lens has shape \[3\], expected \[2\]"):
        gather_kv(
            cache(), cache(), torch.zeros(2, 1, dtype=torch.int32), torch.ones(3, dtype=torch.int32)
        )
    with pytest.raises(ValueError, match=r"block_tables has shape \[2\], expected \[\*, \*\]"):
        gather_kv(
            cache(), cache(), torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="value_cache has dtype float32"):
        gather_kv(
            cache(),
            cache(dtype=torch.float32),
            torch.zeros(2, 1, dtype=torch.int32),
            torch.ones(2, dtype=torch.int32),
        )
