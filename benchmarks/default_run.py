"""The default run's figures: ``kd-train`` with no overrides, timed end to end.

Runs the default recipe (SmolLM2-135M-Instruct teacher → 10-layer copy, forward KL, τ = 1,
80 steps of 4 Dolly examples, validation after 40 and 80 steps) in a child process, then
reads its ``metrics.csv``: the validation KD and CE losses at each validation, the
training KD loss of the first batches, the tokens/s of the training steps and the wall
time. The CPU, whether it computes bfloat16 natively, the torch version and the load
average go beside them, since the losses move with the CPU's kernels:

    python benchmarks/default_run.py              # → benchmarks/results/default_run_cpu.md
    python benchmarks/default_run.py --summarise RUN_DIR --out /tmp/run.md   # an existing run directory
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kd_lightning.precision import cpu_description

RESULTS = Path(__file__).parent / "results"
FIRST_BATCHES = 5  # "the first batches": the mean training KD loss of this many steps


def run_default_recipe(run_dir: Path, overrides: list[str]) -> float:
    """``kd-train`` with ``overrides`` in a child process writing to ``run_dir``; its wall seconds."""
    command = [sys.executable, "-m", "kd_lightning.train", f"hydra.run.dir={run_dir}", *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's ``metrics.csv`` (the CSV logger's, wherever it put it)."""
    (path,) = sorted(Path(run_dir).rglob("metrics.csv"))
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def validation_losses(rows: list[dict[str, str]]) -> list[dict[str, float]]:
    """One entry per validation: the training steps done, the validation KD and CE losses."""
    validations = [row for row in rows if row.get("val/kd_loss")]
    return [
        {"steps": int(row["step"]) + 1, "kd": float(row["val/kd_loss"]), "ce": float(row["val/ce_loss"])}
        for row in validations
    ]


def training_summary(rows: list[dict[str, str]]) -> dict[str, float]:
    """The mean training KD loss of the first batches and the quartiles of tokens/s."""
    training = [row for row in rows if row.get("train/kd_loss")]
    first = [float(row["train/kd_loss"]) for row in training[:FIRST_BATCHES]]
    speeds = sorted(float(row["train/tokens_per_s"]) for row in training if row.get("train/tokens_per_s"))
    quartiles = statistics.quantiles(speeds, n=4) if len(speeds) > 1 else speeds * 3
    return {"first_kd": statistics.fmean(first), "tokens_per_s_q1": quartiles[0], "tokens_per_s_q3": quartiles[2]}


def report(run_dir: Path, seconds: float | None, command: str) -> str:
    """The Markdown page of one run's figures."""
    rows = metrics_rows(run_dir)
    training, validations = training_summary(rows), validation_losses(rows)
    wall = "not timed (an existing run)" if seconds is None else f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    lines = [
        "# The default run (`kd-train`, no overrides)",
        "",
        f"`{command}` on {cpu_description()}, torch {torch.__version__}; load average {os.getloadavg()[0]:.2f} "
        "at the end (other jobs share the machine: the seconds are rough, the losses are not).",
        "",
        "| after steps | validation KD loss | validation CE loss |",
        "|---|---|---|",
        *[f"| {entry['steps']} | {entry['kd']:.3f} | {entry['ce']:.3f} |" for entry in validations],
        "",
        f"Training KD loss of the first {FIRST_BATCHES} batches: {training['first_kd']:.2f}. "
        f"Training tokens/s, quartiles: {training['tokens_per_s_q1']:.0f}–{training['tokens_per_s_q3']:.0f}. "
        f"Wall time, end to end: {wall}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "default_run_cpu.md")
    parser.add_argument("--summarise", type=Path, default=None, help="read this run directory instead of training")
    parser.add_argument("--run-dir", type=Path, default=None, help="keep the run here (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="kd-train overrides (none: the default run)")
    args = parser.parse_args()
    command = " ".join(["python benchmarks/default_run.py", *args.overrides])
    if args.summarise is not None:
        page = report(args.summarise, None, f"python benchmarks/default_run.py --summarise {args.summarise}")
    elif args.run_dir is not None:
        page = report(args.run_dir, run_default_recipe(args.run_dir, args.overrides), command)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            seconds = run_default_recipe(Path(scratch) / "run", args.overrides)
            page = report(Path(scratch) / "run", seconds, command)
    args.out.write_text(page)
    print(page)


if __name__ == "__main__":
    main()
