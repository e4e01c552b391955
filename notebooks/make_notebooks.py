"""Writes the tutorial notebooks from the cell sources below, and executes them
so that they are committed with the outputs of a real run.

    python notebooks/make_notebooks.py            # write and execute all
    python notebooks/make_notebooks.py 01         # only those whose name has '01'

Each notebook reads IDL_NOTEBOOK_QUICK=1 (set by the tests) to shrink its
training runs; the committed outputs come from full-size runs.
"""
import os
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def notebook(cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in cells:
        source = source.strip("\n")
        nb.cells.append(nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source))
    return nb


def execute(nb, timeout=1200):
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    return nb


def main(selection):
    from tutorial_cells import NOTEBOOKS

    for name, cells in NOTEBOOKS.items():
        if selection and not any(s in name for s in selection):
            continue
        nb = execute(notebook(cells))
        nbformat.write(nb, os.path.join(HERE, name))
        print("wrote", name)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main(sys.argv[1:])
