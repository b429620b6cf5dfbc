"""The results notebook runs against a small CSV and writes its plot."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent


def test_tau_sweep_notebook_plots_a_small_csv(tmp_path, monkeypatch):
    monkeypatch.setenv("TAU_SWEEP_CSV", str(ROOT / "tests" / "fixtures" / "tau_sweep_small.csv"))
    monkeypatch.setenv("TAU_SWEEP_PNG", str(tmp_path / "plot.png"))
    notebook = nbformat.read(ROOT / "notebooks" / "tau_sweep.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    outputs = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "12 rows: 2 methods at τ ∈ [0.5, 2.0], 2 test sets" in outputs
    table = notebook.cells[3].outputs[0]["data"]["text/plain"]
    assert "rkl + adakd" in table and "10.50" in table and "9.25" in table  # the means over the two sets
