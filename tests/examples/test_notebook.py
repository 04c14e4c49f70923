"""examples/notebook.ipynb runs top to bottom in a python3 kernel (a broken notebook fails CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


def test_notebook_executes(torch_kernels, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    streams, mimes = [], set()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                streams.append(out.text)
            mimes.update(out.get("data", {}))
    text = "".join(streams)
    assert "paged tokens == stock tokens: True" in text
    assert "turn 2: paged tokens == stock tokens: True" in text
    assert "beam search: paged tokens == stock tokens: True" in text
    assert "prompt tokens reused" in text
    assert {"text/html", "image/png"} <= mimes, "block maps (HTML) and the usage plot (PNG)"
