"""Test-wide setup.

The Triton interpreter reads TRITON_INTERPRET when kernels are decorated, i.e. when
`pagedkv.kernels` is first imported, so it is set here, before any test module imports it.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
