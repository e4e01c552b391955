"""Every tutorial notebook runs top to bottom (at the small sizes that
IDL_NOTEBOOK_QUICK=1 selects), and the committed notebooks hold the cells that
notebooks/tutorial_cells.py defines."""
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
sys.path.insert(0, NOTEBOOKS)

import make_notebooks  # noqa: E402
from tutorial_cells import NOTEBOOKS as SOURCES  # noqa: E402


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_committed_notebook_matches_its_cells(name):
    committed = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    expected = make_notebooks.notebook(SOURCES[name])
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in expected.cells]
    assert all(c.outputs for c in committed.cells if c.cell_type == "code"), "committed without outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("IDL_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = make_notebooks.execute(nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4), timeout=600)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
