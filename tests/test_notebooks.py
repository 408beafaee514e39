"""The notebooks run top to bottom on CPU; their cells assert what they show, and a failing cell
fails the test (nbclient raises CellExecutionError)."""

import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["geometry.ipynb", "quickstart.ipynb"])
def test_notebook_executes(name):
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  assert all(cell.outputs for cell in notebook.cells if cell.cell_type == "code"
             and "print(" in cell.source)
