"""Triton, or stand-ins where it is not installed.

pyproject installs Triton on Linux only; elsewhere (macOS, Windows) the package must still import
and serve the torch backend. Without Triton the kernel definitions stay in place (their
decorators become no-ops and their bodies never run), and `_dispatch` offers only "torch".

`INTERPRETED`: whether `triton.jit` decorates for the Triton interpreter (TRITON_INTERPRET=1 when
the kernels were defined, i.e. when this module was imported). Triton decides per decoration, so
a probe decorated here answers for the kernels decorated right after it.
"""

from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

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


def _probe() -> None:
    pass


INTERPRETED = HAS_TRITON and isinstance(triton.jit(_probe), InterpretedFunction)

__all__ = ["HAS_TRITON", "INTERPRETED", "tl", "triton"]
