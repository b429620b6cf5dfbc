"""``kd-report``: what a user looks at after a run or a sweep, drawn from its ``metrics.csv`` files.

    kd-report outputs/DATE/TIME            # one run: its training and validation loss curves
    kd-report multirun/DATE/TIME           # a sweep: every run's curves, and the final validation
                                           # losses (and ROUGE-L) against τ, one line per divergence
    kd-report multirun/DATE/TIME --out figures/

Writes ``loss_curves.png``, ``final_vs_tau.png`` (a sweep) and ``report.html`` (the figures
embedded, and a table of every run's final values) into ``DIR/report/`` or ``--out``.
Needs matplotlib: ``pip install "kd_lightning[report]"``.
"""

from __future__ import annotations

import argparse
import base64
import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from kd_lightning.cli import reported_errors

#: the final values a sweep is compared by, where the runs logged them
VALIDATION_METRICS = ("val/loss", "val/ce_loss")
#: what takes their place when no run reached a validation
TRAINING_METRICS = ("train/loss", "train/ce_loss")
ROUGE_PREFIX = "eval/rougeL/"


@dataclass
class Run:
    """One run: where it is, what it trained with, and its logged metrics."""

    name: str
    divergence: str
    temperature: float | None
    seed: int | None
    metrics: pd.DataFrame

    def final(self, metric: str) -> float | None:
        """The last logged value of ``metric``, or ``None`` if it was never logged."""
        if metric not in self.metrics:
            return None
        values = self.metrics[metric].dropna()
        return float(values.iloc[-1]) if len(values) else None

    def curve(self, metric: str) -> pd.DataFrame:
        """``step`` and ``metric`` of the rows that logged it."""
        if metric not in self.metrics:
            return pd.DataFrame(columns=["step", metric])
        return self.metrics[["step", metric]].dropna()


def import_pyplot():
    """matplotlib's pyplot, drawing to files (no display needed)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError('kd-report draws its figures with matplotlib: pip install "kd_lightning[report]"') from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_run(metrics_file: Path, root: Path) -> Run:
    """The run whose ``metrics.csv`` is ``metrics_file``; divergence, τ and seed from its
    ``.hydra/config.yaml`` (unknown without one)."""
    directory = metrics_file.parent
    config_file = directory / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config_file) if config_file.is_file() else OmegaConf.create()
    temperature = OmegaConf.select(cfg, "temperature", default=None)
    return Run(
        name=str(directory.relative_to(root)) if directory != root else directory.name,
        divergence=str(OmegaConf.select(cfg, "divergence.name", default="unknown")),
        temperature=None if temperature is None else float(temperature),
        seed=OmegaConf.select(cfg, "seed", default=None),
        metrics=pd.read_csv(metrics_file),
    )


def find_runs(directory: Path) -> list[Run]:
    """Every run under ``directory`` (the directory itself, or the jobs of a sweep) that
    wrote a ``metrics.csv``, in the order of their paths."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: give a kd-train run or sweep directory")
    metrics_files = sorted(directory.rglob("metrics.csv"))
    if not metrics_files:
        raise FileNotFoundError(
            f"no metrics.csv under {directory}: give a kd-train run or sweep directory of runs logged with logger=csv"
        )
    return [read_run(path, directory) for path in metrics_files]


def run_labels(runs: list[Run]) -> list[str]:
    """A short label per run: divergence and τ (and seed where seeds differ); the run's
    directory where that does not tell the runs apart."""
    several_seeds = len({run.seed for run in runs}) > 1
    labels = []
    for run in runs:
        temperature = "?" if run.temperature is None else f"{run.temperature:g}"
        labels.append(f"{run.divergence} τ={temperature}" + (f" seed {run.seed}" if several_seeds else ""))
    return labels if len(set(labels)) == len(labels) else [run.name for run in runs]


def summary(runs: list[Run]) -> pd.DataFrame:
    """One row per run: its label, divergence, τ, seed and the final value of every
    loss and ROUGE-L metric it logged."""
    metrics = sorted({column for run in runs for column in run.metrics if column.startswith(("train/", "val/", ROUGE_PREFIX))})
    rows = [
        {"run": label, "divergence": run.divergence, "temperature": run.temperature, "seed": run.seed,
         **{metric: run.final(metric) for metric in metrics}}
        for label, run in zip(run_labels(runs), runs)
    ]
    return pd.DataFrame(rows)


def draw_curves(runs: list[Run], plt):
    """Training and validation loss against the step, one line per run."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for axis, metric, title in zip(axes, ("train/loss", "val/loss"), ("training loss", "validation loss")):
        for label, run in zip(run_labels(runs), runs):
            curve = run.curve(metric)
            if len(curve):
                axis.plot(curve["step"], curve[metric], marker="o" if len(curve) < 12 else None, markersize=3, label=label)
        axis.set(title=f"{title} ({metric})", xlabel="step", ylabel=metric)
        if not axis.lines:
            axis.text(0.5, 0.5, "not logged\n(no validation in these runs)", ha="center", va="center", transform=axis.transAxes)
    if axes[0].lines:  # beside the panels, where it hides no line
        figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    return figure


def sweep_metrics(table: pd.DataFrame) -> tuple[list[str], str]:
    """The final metrics to draw against τ, and what they are: the validation losses and
    ROUGE-L that were logged, or the training losses where no run reached a validation."""
    rouge = [column for column in table if column.startswith(ROUGE_PREFIX) and table[column].notna().any()]
    validation = [metric for metric in VALIDATION_METRICS if metric in table and table[metric].notna().any()]
    if validation or rouge:
        return validation + rouge, "final validation losses and ROUGE-L"
    return [metric for metric in TRAINING_METRICS if metric in table], "final training losses (no run reached a validation)"


def draw_against_temperature(table: pd.DataFrame, plt):
    """Each final metric against τ (log scale), one line per divergence: the mean over
    seeds, with every run's value as a dot."""
    metrics, what = sweep_metrics(table)
    table = table.dropna(subset=["temperature"])
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), constrained_layout=True, squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for divergence, runs in table.dropna(subset=[metric]).groupby("divergence"):
            mean = runs.groupby("temperature")[metric].mean()
            (line,) = axis.plot(mean.index, mean.values, marker="o", label=divergence)
            axis.scatter(runs["temperature"], runs[metric], s=12, alpha=0.5, color=line.get_color())
        axis.set_xscale("log", base=2)
        axis.set(title=metric, xlabel="τ", ylabel=metric)
        axis.set_xticks(sorted(table["temperature"].unique()), labels=[f"{tau:g}" for tau in sorted(table["temperature"].unique())])
    axes[0][0].legend(fontsize="small")
    figure.suptitle(what)
    return figure


def html_page(title: str, figures: dict[str, Path], table: pd.DataFrame, notes: list[str]) -> str:
    """A self-contained page: the figures embedded as base64 PNGs, then the table."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}img{max-width:100%}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
             f"</head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    for caption, path in figures.items():
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' src='data:image/png;base64,{encoded}'>")
    parts.append("<h2>final values per run</h2>" + table.to_html(index=False, na_rep="", float_format=lambda value: f"{value:.4g}"))
    return "\n".join(parts + ["</body></html>"])


def save(figure, path: Path, plt) -> None:
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(directory: Path, out: Path | None = None) -> list[Path]:
    """Draw the report of the run or sweep in ``directory`` into ``out`` (default
    ``directory/report``): the PNGs and ``report.html``; returns the files written."""
    plt = import_pyplot()
    directory = Path(directory)
    runs, out = find_runs(directory), Path(out or directory / "report")
    out.mkdir(parents=True, exist_ok=True)
    table = summary(runs)
    figures = {"loss curves per run": out / "loss_curves.png"}
    notes = [f"{len(runs)} run{'s' if len(runs) > 1 else ''} under {directory}. The training and validation losses are "
             "τ²·D at each run's own τ (plus any cross-entropy term): compare them across τ with care; "
             "val/ce_loss, the student's cross-entropy on the reference responses, does not depend on τ."]
    save(draw_curves(runs, plt), figures["loss curves per run"], plt)
    if len(runs) > 1 and table["temperature"].notna().any() and sweep_metrics(table)[0]:
        figures["final values against τ, per divergence"] = out / "final_vs_tau.png"
        notes.append(f"Against τ: the {sweep_metrics(table)[1]}, the mean over seeds per divergence, each run a dot.")
        save(draw_against_temperature(table, plt), figures["final values against τ, per divergence"], plt)
    page = out / "report.html"
    page.write_text(html_page(f"kd-report: {directory.name}", figures, table, notes), encoding="utf-8")
    return [*figures.values(), page]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a kd-train run directory, or a sweep directory (multirun/…)")
    parser.add_argument("--out", type=Path, help="where to write the figures and report.html (default: DIRECTORY/report)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with reported_errors("kd-report", args.debug):
        for path in write_report(args.directory, args.out):
            print(path)


if __name__ == "__main__":
    main()
