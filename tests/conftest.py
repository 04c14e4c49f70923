"""Test-wide setup.

The Triton interpreter reads TRITON_INTERPRET when kernels are decorated, i.e. when
`pagedkv.kernels` is first imported, so it is set here, before any test module imports it.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis profiles (HYPOTHESIS_PROFILE=...): "dev" explores new random cases on every run;
# "ci" (the default where CI is set) replays the same cases every run, so a gate never fails
# on a case it had not tried before; "thorough" is the long bug hunt to run after changing the
# manager. A failure prints the case and a @reproduce_failure blob.
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("dev", max_examples=150)
settings.register_profile("ci", max_examples=1000, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=5000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors run faster on one torch thread: waking the intra-op threads for each op
    costs more than the op, and milliseconds per op when another process keeps a core busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
