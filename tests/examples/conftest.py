"""Load the example scripts as modules, so tests call their `main(argv)` in-process.

Example runs that call `generate` use the torch kernels backend: the root conftest sets
TRITON_INTERPRET=1, which would otherwise send CPU tensors to the (slow) Triton interpreter.
They run on one CPU thread: on a busy 2-core machine two threads contend and run the real model
several times slower (as tests/integrations does for the same reason).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# As when run as scripts: the examples import their shared helpers (`_common`) from their folder.
sys.path.insert(0, str(EXAMPLES))


def _load(name: str):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pagedkv_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_example():
    """`load_example("generate")` -> the module of examples/generate.py."""
    return _load


@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setenv("PAGEDKV_BACKEND", "torch")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
