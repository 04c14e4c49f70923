"""Triton, or stand-ins where it is not installed.

pyproject installs Triton on Linux only; elsewhere (macOS, Windows) the package must still import
and serve the torch backend. Without Triton the kernel definitions stay in place (their
decorators become no-ops and their bodies never run), and `_dispatch` offers only "torch".
"""

from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    HAS_TRITON = False

    class _Config:
        def __init__(self, kwargs: dict, num_warps: int = 4, num_stages: int = 2, **_: Any):
            self.kwargs, self.num_warps, self.num_stages = kwargs, num_warps, num_stages

    class _NoTriton:
        """The few `triton` attributes used at import time."""

        Config = _Config

        @staticmethod
        def jit(fn: Any = None, **_: Any) -> Any:
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(**_: Any) -> Any:
            return lambda fn: fn

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    triton = _NoTriton()
    tl = None

__all__ = ["HAS_TRITON", "tl", "triton"]
