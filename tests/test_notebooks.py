"""Notebooks as stored and as a learner sees them: no outputs in git, one setup cell, every figure shown once."""

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def cells(path):
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    for i, c in enumerate(cells(path)):
        if c["cell_type"] == "code":
            assert c.get("outputs") == [] and c.get("execution_count") is None, f"{path.name} cell {i} has outputs"
        assert c.get("id"), f"{path.name} cell {i} has no id (nbformat 4.5 requires one)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_starts_with_the_same_setup_cell(path):
    from labkit.course import SETUP_CELL

    first_code = next(c for c in cells(path) if c["cell_type"] == "code")
    assert "".join(first_code["source"]) == SETUP_CELL, f"run `python tools/setup_cell.py` to update {path.name}"
    assert json.loads(path.read_text())["metadata"].get("accelerator") == "GPU"
    assert "On Colab:" in "".join(cells(path)[0]["source"])  # the line a course build puts the Colab link on


def test_plot_helpers_stay_outside_pyplot():
    import matplotlib.pyplot as plt

    from labkit.results import Record
    from labkit.viz import plots

    rec = Record("quantization")
    rec.add("fp32", model="m", weight_bytes=100, perplexity=10.0)
    rec.add("int8", model="m", weight_bytes=40, perplexity=10.1)
    before = plt.get_fignums()
    plots.metric_bars(rec, "weight_bytes")
    plots.scatter(rec, "weight_bytes", "perplexity")
    assert plt.get_fignums() == before  # the inline backend will not show them a second time


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executed_notebook_shows_each_figure_once(path):
    """Count images in every cell's output of the notebook as executed — by nbmake earlier in this session (`make
    test`: tests/conftest.py keeps its run and orders this check after it), else here as JupyterLab would (nbclient,
    quick mode). The longest quick-mode cell takes about a minute; 300 s per cell bounds a stalled kernel."""
    from tests.conftest import EXECUTED

    nb = EXECUTED.get(path.name)
    seconds = 0.0
    if nb is None:
        nbformat = pytest.importorskip("nbformat")
        from nbclient import NotebookClient

        nb = nbformat.read(path, as_version=4)
        os.environ["LABKIT_QUICK"] = "1"
        t0 = time.perf_counter()
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
        seconds = time.perf_counter() - t0
    total = 0
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        images = sum(1 for o in c.outputs for k in o.get("data", {}) if k.startswith("image/"))
        assert images <= 1, f"{path.name} cell {i} shows {images} images (a figure displayed twice?)"
        shown_as_text = [o for o in c.outputs if o.get("data", {}).get("text/plain", "").startswith("<Figure")
                         and not any(k.startswith("image/") for k in o["data"])]
        assert not shown_as_text, f"{path.name} cell {i} shows a figure as text, not as an image"
        total += images
    assert total >= 1, f"{path.name} shows no figure at all"
    print(f"{path.name}: " + (f"{seconds:.0f} s in quick mode" if seconds else "read from nbmake's run"))
