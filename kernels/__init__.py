"""pagedkv.kernels: Triton kernels for a paged KV cache, their launchers, and a torch reference.

Public ops (each validates its arguments and dispatches to Triton or the torch reference):

- `write_kv`         new keys/values -> their cache slots
- `paged_attention`  packed queries (decode, prefill, prefill over a cached prefix) over paged K/V
- `copy_blocks`      whole blocks, every layer in one launch (copy-on-write, fork)
- `gather_kv`        paged -> contiguous K/V

Bad index values (block ids, lengths, slots, query offsets) never make an op read or write
outside its tensors: launchers reject them with a ValueError where reading them is free (CPU
tensors, the torch backend); on CUDA the kernels mask them instead (no host sync, so steps stay
CUDA-graph capturable). Each op's docstring says which inputs are rejected and how the kernel
masks them.

`reference` holds the same ops in pure torch (the CPU backend); `pagedkv.kernels.testing` (not
imported here) builds the paged problems the kernel tests and benchmarks run the ops on.
Backend choice: the ``backend=`` argument, then ``PAGEDKV_BACKEND``, then Triton for CUDA
tensors (and for CPU tensors under ``TRITON_INTERPRET=1``), else torch; `trace_backends()`
records which one ran.

Launch configs: ``config=KernelConfig(...)`` (or a dict) on `paged_attention` / `write_kv`
runs that config; `set_tuned_config` / `load_tuned_configs` register configs by
`config_key(head_dim=, block_size=, dtype=, mode=)`; otherwise a launch runs the op's shipped
default (launchers never autotune). `save_tuned_configs` writes the registered configs. A
``tuned_configs.json`` beside this file is loaded if shipped. `candidate_configs` of the
attention and write_kv modules lists a launch's candidate space (what examples/autotune.py
sweeps).
"""

from . import reference
from ._config import (
    KernelConfig,
    clear_tuned_configs,
    config_key,
    get_tuned_config,
    load_tuned_configs,
    save_tuned_configs,
    set_tuned_config,
)
from ._dispatch import BACKENDS, resolve_backend, trace_backends, triton_interpreted
from .attention import paged_attention
from .copy_blocks import copy_blocks
from .gather_kv import gather_kv
from .write_kv import write_kv

__all__ = [
    "BACKENDS",
    "KernelConfig",
    "clear_tuned_configs",
    "config_key",
    "copy_blocks",
    "gather_kv",
    "get_tuned_config",
    "load_tuned_configs",
    "paged_attention",
    "reference",
    "resolve_backend",
    "save_tuned_configs",
    "set_tuned_config",
    "trace_backends",
    "triton_interpreted",
    "write_kv",
]
