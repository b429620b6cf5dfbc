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


def test_study_notebook_gives_verdicts_and_plots_from_a_small_csv(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDY_CSV", str(ROOT / "tests" / "fixtures" / "study_small.csv"))
    monkeypatch.setenv("STUDY_FIGURES", str(tmp_path))
    runs = tmp_path / "study_runs"
    (runs / "logs").mkdir(parents=True)  # one run with its training time, resumed once on another CPU
    (runs / "gkd-seed0.csv").write_text("divergence,seed,metric,dataset,value\njsd,0,nll,dolly-test,4.5\njsd,0,train_seconds,all,5400\n")
    (runs / "logs" / "gkd-seed0.machines.txt").write_text("2026-12-07 21:54:34 started on CPU A, 1 thread, no native bf16\n"
                                                         "2026-12-07 23:24:00 resumed on CPU B, 1 thread, native bf16\n")
    (runs / "ce-seed0.csv").write_text("divergence,seed,metric,dataset,value\nce,0,nll,dolly-test,4.7\n")  # recorded none
    monkeypatch.setenv("STUDY_RUNS", str(runs))
    notebook = nbformat.read(ROOT / "notebooks" / "study.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    for name in ("study_tau.png", "study_arms.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    outputs = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "118 rows, 7 arms, seeds [0, 1], 2000 training examples per run" in outputs
    per_set = next(cell.outputs[0]["data"]["text/plain"] for cell in notebook.cells if "per_set" in cell.source)
    assert "vicuna" in per_set and "13.25 ± 0.35" in per_set  # FKL at τ = 1 on Vicuna
    wall = next(cell.outputs[0]["data"]["text/plain"] for cell in notebook.cells if "machines(path.stem)" in cell.source)
    assert "gkd-seed0" in wall and "1.5" in wall and "ce-seed0" not in wall
    assert "2 part(s) on CPU A, 1 thread, no native bf16; CPU B, 1 thread, native bf16" in wall
    # paired over the two seeds: RKL's ROUGE-L is 1 point above FKL's at τ = 1 in both
    assert "| RKL ahead of FKL at τ = 1 | rouge_l | 2 | +1.00 [+1.00, +1.00] | holds |" in outputs
    assert "| FKL ahead of RKL at τ = 2 | nll | 2 | -0.10 [-0.10, -0.10] | reversed |" in outputs
