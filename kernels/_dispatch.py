"""Backend choice for every op, and a way to see which backend ran.

Precedence: the op's ``backend=`` argument, then the ``PAGEDKV_BACKEND`` environment variable,
then the default: Triton for CUDA tensors; for CPU tensors Triton only when the kernels were
decorated under the Triton interpreter (``TRITON_INTERPRET=1`` before import), else torch.
Without Triton installed, torch everywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

from ._triton import HAS_TRITON, INTERPRETED

BACKENDS = ("triton", "torch")
ENV_VAR = "PAGEDKV_BACKEND"

# The list the innermost `trace_backends()` block appends to; None outside any block. A context
# variable rather than a module global, so concurrent threads/tasks trace independently.
_TRACE: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "pagedkv_kernels_trace", default=None
)


def triton_interpreted() -> bool:
    """True when the Triton kernels were decorated by the interpreter (they run on CPU tensors)."""
    return INTERPRETED


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend an op runs with on `device`: "triton" or "torch"."""
    # Every launch asks: the default (no argument, no environment variable) returns at once.
    if backend is None:
        backend = os.environ.get(ENV_VAR)
        if not backend:
            kind = device.type
            if kind == "cuda":
                return "triton" if HAS_TRITON else "torch"
            return "triton" if kind == "cpu" and triton_interpreted() else "torch"
        source = ENV_VAR
    else:
        source = "backend"
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown kernels backend {source}={backend!r}; expected one of {BACKENDS}"
        )
    if backend == "triton" and not HAS_TRITON:
        raise ValueError(f"{source}='triton' but Triton is not installed; use backend 'torch'")
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend 'triton' on {device.type} tensors needs the Triton interpreter "
            "(set TRITON_INTERPRET=1 before pagedkv.kernels is imported); use backend 'torch'"
        )
    return backend


def record(op: str, backend: str) -> None:
    """Note that `op` ran on `backend` in the active `trace_backends()` block, if any."""
    trace = _TRACE.get()
    if trace is not None:
        trace.append((op, backend))


@contextlib.contextmanager
def trace_backends() -> Iterator[list[tuple[str, str]]]:
    """Record ``(op, backend)`` for every op called inside the block.

    >>> with trace_backends() as calls:
    ...     write_kv(k, v, kc, vc, slots)
    >>> calls
    [('write_kv', 'triton')]
    """
    calls: list[tuple[str, str]] = []
    token = _TRACE.set(calls)
    try:
        yield calls
    finally:
        _TRACE.reset(token)
