"""What the KV cache looks like: device, dtype, geometry and pool size.

`KVCacheConfig` is frozen and validated on construction, so every other module can trust it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from ._memory import available_bytes, default_budget, split_budget

__all__ = ["CROP_STEP", "AttentionGroup", "DType", "DeviceType", "KVCacheConfig", "model_windows"]

# A sliding-window group keeps the window of a step's first token when the step has at most
# this many tokens (so that a crop back into it works); of a longer step, the window of its end.
CROP_STEP = 64


class DeviceType(str, Enum):
    """Where the block pool lives."""

    CPU = "cpu"
    CUDA = "cuda"


class DType(str, Enum):
    """Storage dtype of the block pool."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.value)

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @classmethod
    def parse(cls, value: Any) -> DType:
        """Accept a `DType`, a `torch.dtype` or a name ("float16", "fp16", "half", "bf16", ...)."""
        if isinstance(value, DType):
            return value
        if isinstance(value, torch.dtype):
            for member in cls:
                if member.torch_dtype == value:
                    return member
            raise ValueError(
                f"dtype {value} is not supported for the KV cache; "
                f"expected one of {[m.value for m in cls]}"
            )
        if isinstance(value, str):
            name = value.removeprefix("torch.").lower()
            aliases = {
                "fp16": "float16",
                "half": "float16",
                "bf16": "bfloat16",
                "fp32": "float32",
                "float": "float32",
            }
            name = aliases.get(name, name)
            for member in cls:
                if member.value == name:
                    return member
        raise ValueError(
            f"dtype {value!r} is not supported for the KV cache; "
            f"expected one of {[m.value for m in cls]} (or the matching torch.dtype)"
        )


def _parse_device(value: Any) -> tuple[DeviceType, int | None]:
    if isinstance(value, DeviceType):
        return value, None
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device {value!r} is not a valid device; expected 'cpu' or 'cuda[:N]'"
        ) from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {value!r} is not supported; expected 'cpu' or 'cuda[:N]'")
    return DeviceType(dev.type), dev.index


@dataclass(frozen=True)
class AttentionGroup:
    """Layers that attend alike and share one pool of blocks (a KV cache group)."""

    window: int | None  # sliding window: a query sees the keys this close to it; None: all
    layers: tuple[int, ...]  # the model's layer indices, ascending


@dataclass(frozen=True)
class KVCacheConfig:
    """Geometry and size of a paged KV cache.

    Layers are grouped by how they attend (`layer_windows`: full attention, or one group per
    sliding window); each group has its own pool of blocks, a block holding `block_size`
    tokens of K and V for every layer of its group. Size the pools with one of `num_blocks`
    (blocks of each group: one count for all, or one per group in `groups` order: full attention
    first, then sliding windows, narrowest first), `memory_budget_bytes` (split
    so that every group holds as many sequences of `context_length` tokens; a sliding group
    keeps only a window of each, or a short prompt whole: see `_memory.split_budget`) or
    `memory_fraction` (a fraction of the device memory free now, host RAM for CPU, split
    likewise). `num_cpu_blocks` sizes the CPU swap space of each
    group (0 = no swapping).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    num_blocks: int | tuple[int, ...] | None = None
    memory_budget_bytes: int | None = None
    memory_fraction: float | None = None
    dtype: DType = DType.FLOAT32
    device: DeviceType = DeviceType.CPU
    device_index: int | None = None
    enable_prefix_caching: bool = True
    num_cpu_blocks: int = 0
    # Each layer's sliding window, None for full attention (the default: every layer full).
    layer_windows: tuple[int | None, ...] | None = None
    # The sequence length a memory budget is split for (see above).
    context_length: int = 4096
    groups: tuple[AttentionGroup, ...] = dataclasses.field(init=False, compare=False, repr=False)
    # Per layer: (its group, its index among that group's layers).
    layer_groups: tuple[tuple[int, int], ...] = dataclasses.field(
        init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("dtype", DType.parse(self.dtype))
        if not isinstance(self.device, DeviceType) or self.device_index is None:
            kind, index = _parse_device(self.device)
            set_("device", kind)
            if self.device_index is None:
                set_("device_index", index)
        if self.device_index is not None:
            _check_int("device_index", self.device_index, minimum=0)
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.block_size & (self.block_size - 1):
            raise ValueError(
                f"block_size={self.block_size} must be a power of two (1, 2, 4, ... 128)"
            )
        if self.block_size > 128:
            raise ValueError(f"block_size={self.block_size} is too large; expected at most 128")
        _check_int("num_cpu_blocks", self.num_cpu_blocks, minimum=0)
        _check_int("context_length", self.context_length, minimum=1)
        set_("layer_windows", _layer_windows(self.layer_windows, self.num_layers))
        set_("groups", _groups(self.layer_windows))
        set_(
            "layer_groups",
            tuple(
                next(
                    (g, grp.layers.index(i)) for g, grp in enumerate(self.groups) if i in grp.layers
                )
                for i in range(self.num_layers)
            ),
        )
        sizes = {  # how the pool is sized: exactly one
            name: getattr(self, name)
            for name in ("num_blocks", "memory_budget_bytes", "memory_fraction")
            if getattr(self, name) is not None
        }
        if len(sizes) != 1:
            raise ValueError(
                "KVCacheConfig needs exactly one of num_blocks, memory_budget_bytes or "
                f"memory_fraction; got {sizes or 'none'}"
            )
        if self.memory_fraction is not None:
            fraction = self.memory_fraction
            if (
                isinstance(fraction, bool)
                or not isinstance(fraction, (int, float))
                or not (0 < fraction <= 1)
            ):
                raise ValueError(
                    f"memory_fraction={fraction!r} is invalid; expected a number in (0, 1]"
                )
            set_("memory_budget_bytes", int(fraction * available_bytes(self.torch_device)))
        if self.num_blocks is None:
            _check_int("memory_budget_bytes", self.memory_budget_bytes, minimum=1)
            blocks = split_budget(
                self.memory_budget_bytes,
                [self.group_bytes_per_block(g) for g in range(len(self.groups))],
                [g.window for g in self.groups],
                self.block_size,
                self.context_length,
                CROP_STEP,
            )
            if min(blocks) < 1:
                raise ValueError(
                    f"{next(iter(sizes))}={next(iter(sizes.values()))} holds no block "
                    f"({self.memory_budget_bytes} bytes); one block of every group needs "
                    f"{self.bytes_per_block} bytes"
                )
            # The request becomes block counts: a copy (`replace`) keeps the pools' sizes.
            set_("num_blocks", blocks[0] if len(set(blocks)) == 1 else tuple(blocks))
            set_("memory_budget_bytes", None)
            set_("memory_fraction", None)
        elif isinstance(self.num_blocks, tuple):
            if len(self.num_blocks) != len(self.groups):
                raise ValueError(
                    f"num_blocks={self.num_blocks} has {len(self.num_blocks)} counts; expected "
                    f"one per group ({len(self.groups)}: windows {[g.window for g in self.groups]})"
                )
            for count in self.num_blocks:
                _check_int("num_blocks", count, minimum=1)
        else:
            _check_int("num_blocks", self.num_blocks, minimum=1)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching={self.enable_prefix_caching!r} must be a bool")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype.torch_dtype

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device.value, self.device_index)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        """A block of every group: `block_size` tokens of K and V across all layers."""
        return self.block_size * self.bytes_per_token

    def group_bytes_per_block(self, group: int) -> int:
        """A block of group `group`: `block_size` tokens of K and V of its layers."""
        layers = len(self.groups[group].layers)
        return (
            2 * layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        )

    def group_blocks(self, group: int) -> int:
        """How many blocks group `group`'s pool holds."""
        counts = self.num_blocks
        return counts[group] if isinstance(counts, tuple) else counts

    @property
    def total_bytes(self) -> int:
        return sum(
            self.group_blocks(g) * self.group_bytes_per_block(g) for g in range(len(self.groups))
        )

    @property
    def total_blocks(self) -> int:
        """Blocks of every group together."""
        return sum(self.group_blocks(g) for g in range(len(self.groups)))

    @property
    def max_tokens(self) -> int:
        """Tokens the first group's pool holds (the full-attention group, when there is one)."""
        return self.group_blocks(0) * self.block_size

    def num_blocks_for_memory(self, num_bytes: int) -> int:
        """How many whole blocks fit in `num_bytes`."""
        return int(num_bytes) // self.bytes_per_block

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def replace(self, **changes: Any) -> KVCacheConfig:
        """A copy with some fields changed (validated again); a new size replaces the old."""
        sizes = ("num_blocks", "memory_budget_bytes", "memory_fraction")
        if any(changes.get(name) is not None for name in sizes):
            changes = {**dict.fromkeys(sizes), **changes}
        if "device" in changes and "device_index" not in changes:
            changes["device_index"] = None
        return dataclasses.replace(self, **changes)

    # ---- construction from a transformers config ------------------------------------------
    @classmethod
    def from_model_config(cls, hf_config: Any, **overrides: Any) -> KVCacheConfig:
        """Read layers, KV heads (GQA/MQA) and head_dim from a transformers `PretrainedConfig`.

        Overrides are any `KVCacheConfig` fields (block_size, num_blocks, dtype, device, ...).
        Without a size (`num_blocks`, `memory_budget_bytes`, `memory_fraction`) the pool is
        sized for its device (see `_memory.default_budget`): on CUDA half the free memory, on
        CPU at most 1 GiB.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(
                f"unknown KVCacheConfig field(s) {sorted(unknown)}; expected some of {sorted(fields)}"
            )
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        num_layers = _first_attr(text, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
        num_heads = _first_attr(text, "num_attention_heads", "n_head", "num_heads", "n_heads")
        hidden = _first_attr(text, "hidden_size", "n_embd", "d_model", "dim")
        if num_layers is None or num_heads is None:
            raise ValueError(
                f"cannot read the layer and head counts from {type(hf_config).__name__}; "
                "pass num_layers, num_kv_heads and head_dim to KVCacheConfig directly"
            )
        num_kv_heads = _first_attr(text, "num_key_value_heads", "num_kv_heads", "n_kv_heads")
        if getattr(text, "new_decoder_architecture", False):
            num_kv_heads = num_heads  # falcon's new architecture caches K/V broadcast to all heads
        elif getattr(text, "multi_query", False):  # gpt_bigcode / falcon MQA flag
            num_kv_heads = 1
        if num_kv_heads is None:
            num_kv_heads = num_heads
        head_dim = getattr(text, "head_dim", None)
        if head_dim is None:
            if hidden is None:
                raise ValueError(f"cannot infer head_dim from {type(hf_config).__name__}")
            head_dim = hidden // num_heads
        values: dict[str, Any] = {
            "num_layers": int(num_layers),
            "num_kv_heads": int(num_kv_heads),
            "head_dim": int(head_dim),
            "layer_windows": model_windows(text, int(num_layers)),
        }
        context = getattr(text, "max_position_embeddings", None)
        if isinstance(context, int) and context > 0:
            values["context_length"] = min(context, 32768)
        dtype = getattr(text, "dtype", None)  # (`torch_dtype` is its deprecated alias)
        if dtype is not None:
            # An unsupported checkpoint dtype (e.g. fp8) keeps the default unless overridden.
            with contextlib.suppress(ValueError):
                values["dtype"] = DType.parse(dtype)
        values.update(overrides)
        sizes = ("num_blocks", "memory_budget_bytes", "memory_fraction")
        if all(values.get(name) is None for name in sizes):
            unsized = cls(**{**values, "num_blocks": 1})
            values["memory_budget_bytes"] = default_budget(
                unsized.torch_device, unsized.bytes_per_block
            )
        return cls(**values)


def _layer_windows(windows: Any, num_layers: int) -> tuple[int | None, ...]:
    if windows is None:
        return (None,) * num_layers
    windows = tuple(windows)
    if len(windows) != num_layers:
        raise ValueError(
            f"layer_windows has {len(windows)} entries; expected one per layer ({num_layers})"
        )
    for w in windows:
        if w is not None:
            _check_int("layer_windows entry", w, minimum=1)
    return windows


def _groups(windows: tuple[int | None, ...]) -> tuple[AttentionGroup, ...]:
    """Full attention first, then one group per sliding window, narrowest first."""
    keys = sorted(set(windows), key=lambda w: (w is not None, w or 0))
    return tuple(AttentionGroup(w, tuple(i for i, x in enumerate(windows) if x == w)) for w in keys)


def model_windows(text_config: Any, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window as a transformers config says: `layer_types`
    ("sliding_attention", "full_attention", ...) with `sliding_window`, or a `sliding_window`
    for every layer (mistral style, unless `use_sliding_window` is off)."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        chunked = [i for i, kind in enumerate(layer_types) if kind == "chunked_attention"]
        if chunked:
            raise ValueError(
                f"layers {chunked} use chunked attention, which pagedkv does not implement"
            )
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if window and getattr(text_config, "use_sliding_window", True):
        return (int(window),) * num_layers
    return (None,) * num_layers


def _first_attr(obj: Any, *names: str) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= {minimum}")
