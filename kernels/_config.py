"""Launch configurations: the explicit `config=` of a launcher, and tuned configs by key.

A launcher picks its config in this order: the caller's ``config=``; a tuned config under the
op's key (loaded with `load_tuned_configs`, set with `set_tuned_config`, or shipped as
``tuned_configs.json`` beside this file); else the op's shipped default. Launchers never
autotune: examples/autotune.py sweeps each op's candidate configs and saves the best with
`save_tuned_configs`.
Keys name head_dim, block_size and dtype (and the attention mode), never token counts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters; None leaves a field to the launcher.

    paged_attention reads block_m, block_n, num_splits, num_warps, num_stages;
    write_kv reads block_h, num_warps. Other fields are ignored by an op.
    """

    block_m: int | None = None  # attention: query rows per program (query tokens x group heads)
    block_n: int | None = None  # attention: keys per KV tile
    block_h: int | None = None  # write_kv: kv heads per program
    num_splits: int | None = None  # attention: split-K partitions of the key range
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelConfig.{field.name} must be a positive int, got {value!r}")
            powers_of_two = ("block_m", "block_n", "block_h", "num_warps")
            if field.name in powers_of_two and value & (value - 1):
                raise ValueError(f"KernelConfig.{field.name} must be a power of 2, got {value}")

    @classmethod
    def coerce(cls, config: KernelConfig | dict[str, Any] | None) -> KernelConfig | None:
        """Accept a KernelConfig, a dict of its fields, or None."""
        if config is None or isinstance(config, KernelConfig):
            return config
        if isinstance(config, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(config) - names)
            if unknown:
                raise ValueError(
                    f"unknown KernelConfig fields {unknown}; expected some of {sorted(names)}"
                )
            return cls(**config)
        raise ValueError(
            f"config must be a KernelConfig, a dict or None, got {type(config).__name__}"
        )

    def merged(self, defaults: KernelConfig) -> KernelConfig:
        """This config with its None fields taken from `defaults`."""
        return _merged(self, defaults)

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@functools.lru_cache(maxsize=1024)  # launchers merge on every launch; configs are frozen
def _merged(config: KernelConfig, defaults: KernelConfig) -> KernelConfig:
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        values[field.name] = getattr(defaults, field.name) if value is None else value
    return KernelConfig(**values)


@functools.lru_cache(maxsize=1024)
def config_key(
    *, head_dim: int, block_size: int, dtype: torch.dtype, mode: str | None = None
) -> str:
    """The tuned-config key of a launch, e.g. ``"D128-bs16-bfloat16-decode"``."""
    key = f"D{head_dim}-bs{block_size}-{str(dtype).removeprefix('torch.')}"
    return f"{key}-{mode}" if mode else key


class TunedConfigs:
    """op name -> key -> KernelConfig, with a JSON round trip.

    One process-wide instance, `TUNED`, which launchers consult, like Triton's own autotune
    cache (it only ever holds configs, so a stale entry costs speed, never correctness). It
    starts from ``tuned_configs.json`` beside this file, if shipped.
    """

    def __init__(self, defaults_path: Path | None = None) -> None:
        self._table: dict[str, dict[str, KernelConfig]] = {}
        self._defaults_path = defaults_path
        # Bumped by every change: launchers cache their launch plans under it (see
        # attention._launch_plan), so a config set, loaded or cleared takes effect at once.
        self.version = 0

    def _load_defaults(self) -> None:
        path, self._defaults_path = self._defaults_path, None
        if path is not None and path.exists():
            with open(path) as f:
                self.update_from_dict(json.load(f))
            self.version += 1

    def get(self, op: str, key: str) -> KernelConfig | None:
        self._load_defaults()
        return self._table.get(op, {}).get(key)

    def set(self, op: str, key: str, config: KernelConfig | dict[str, Any]) -> None:
        self._load_defaults()
        self._table.setdefault(op, {})[key] = KernelConfig.coerce(config)
        self.version += 1

    def clear(self) -> None:
        """Forget every config, shipped defaults included."""
        self._defaults_path = None
        self._table.clear()
        self.version += 1

    def to_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        self._load_defaults()
        return {
            op: {key: config.to_dict() for key, config in sorted(table.items())}
            for op, table in sorted(self._table.items())
        }

    def update_from_dict(self, data: dict[str, dict[str, dict[str, int]]]) -> None:
        for op, table in data.items():
            for key, config in table.items():
                self._table.setdefault(op, {})[key] = KernelConfig.coerce(config)
        self.version += 1


SHIPPED_CONFIGS = Path(__file__).with_name("tuned_configs.json")
TUNED = TunedConfigs(SHIPPED_CONFIGS)


def save_tuned_configs(path: str | os.PathLike) -> None:
    """Write the registered configs (set, loaded or shipped) as JSON (op -> key -> config
    fields)."""
    data = TUNED.to_dict()
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def load_tuned_configs(path: str | os.PathLike, *, replace: bool = False) -> None:
    """Read configs written by `save_tuned_configs`; launchers use them by key from now on."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
        raise ValueError(f"{path}: expected a JSON object of op -> key -> config")
    if replace:
        TUNED.clear()
    TUNED.update_from_dict(data)


def set_tuned_config(op: str, key: str, config: KernelConfig | dict[str, Any]) -> None:
    """Register the config `op` uses for launches whose key (see `config_key`) is `key`."""
    TUNED.set(op, key, config)


def get_tuned_config(op: str, key: str) -> KernelConfig | None:
    return TUNED.get(op, key)


def clear_tuned_configs() -> None:
    """Forget loaded, set and shipped configs."""
    TUNED.clear()


def from_triton_config(config: Any, fields: tuple[str, ...]) -> KernelConfig:
    """The KernelConfig of a `triton.Config` from an op's candidate space, with only `fields`
    (those the op's launcher tunes, so that the config run as a tuned config is the same)."""
    names = {"BLOCK_N": "block_n", "BLOCK_H": "block_h", "BLOCK_M": "block_m"}
    values = {names[k]: v for k, v in config.kwargs.items() if k in names}
    values.update(num_warps=config.num_warps, num_stages=config.num_stages)
    return KernelConfig(**{field: values[field] for field in fields})
