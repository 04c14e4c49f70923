"""Fixtures of the kernel tests (tests import nothing from here).

Paged problems come from `pagedkv.kernels.testing` (the builder examples/benchmark_kernels.py and
examples/autotune.py use too): a NaN-poisoned block-major pool whose per-layer key/value caches
are strided views, as in kvcache, with block 0 reserved as the padding entry of block tables, so
an op that reads a slot it should not returns NaN.
"""

from __future__ import annotations

import pytest

from pagedkv.kernels.testing import make_paged_problem


@pytest.fixture
def make_paged():
    return make_paged_problem
