"""Why a student's answers run long: how much probability each model gives to ending the
answer (EOS) where the reference ends, and inside the reference, on Dolly test.

For every Dolly test example whose prompt, reference and EOS fit ``--max-length`` tokens,
each model reads the prompt and the reference (teacher forcing) and the probe records

- ``p_eos_end``: p(EOS | prompt, whole reference), the probability of stopping where the
  reference stops (the teacher's is the target a distilled student is pulled towards);
- ``p_eos_inside``: p(EOS | prompt, reference[:t]) averaged over the reference's tokens,
  the probability of stopping too early.

Each is averaged over the examples (``mean``) and given as the median over examples
(``median``). Models: the teacher and the untrained student (built from the first run's
config, once: skipped when ``--out`` has their rows) and each run's trained student (its
``checkpoints/last.ckpt``). Rows are merged into ``--out``: a model probed again replaces
its rows, the others' stay, so runs whose checkpoints are gone keep their figures. Every
model is read under bf16 autocast, as the study evaluates them; probabilities in float32.

    python results/eos_probe.py /root/kd-study/runs/{ce,fkl-tau1,rkl-tau1}-seed1 --out results/study_eos.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from kd_lightning.constants import IGNORE_INDEX
from kd_lightning.data.datamodule import check_record, encode_example
from kd_lightning.evaluation import eval_records
from kd_lightning.runs import load_run


@torch.no_grad()
def eos_probabilities(model, tokenizer, records: list[dict], max_length: int) -> dict[str, list[float]]:
    """Per example: p(EOS) at the reference's end and its mean inside the reference."""
    found = {"p_eos_end": [], "p_eos_inside": []}
    for record in records:
        record = check_record(record, "instruction/input/output", "dolly-test", {})  # as training reads it
        example = encode_example(tokenizer, record, max_length)
        if not example["input_ids"] or example["truncated"]:
            continue
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor(example["labels"][1:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits[0, :-1]
        p_eos = logits.float().softmax(-1)[:, tokenizer.eos_token_id][labels != IGNORE_INDEX]
        found["p_eos_end"].append(float(p_eos[-1]))
        found["p_eos_inside"].append(float(p_eos[:-1].mean()))
    return found


def summary_rows(model: str, found: dict[str, list[float]]) -> list[dict]:
    """The mean and the median over examples of each of ``found``'s probabilities."""
    rows = []
    for metric, values in found.items():
        values = torch.tensor(values)
        rows += [
            {"model": model, "metric": metric, "statistic": statistic, "value": f"{float(value):.4g}"}
            for statistic, value in (("mean", values.mean()), ("median", values.median()))
        ]
    return rows


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """``old``'s rows with those of every model in ``new`` replaced by ``new``'s."""
    replaced = {row["model"] for row in new}
    return [row for row in old if row["model"] not in replaced] + new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories whose students to probe")
    parser.add_argument("--examples", type=int, default=200, help="the first N Dolly test examples")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("results/study_eos.csv"))
    args = parser.parse_args()
    records = eval_records("dolly-test", args.examples)
    old = list(csv.DictReader(args.out.open())) if args.out.exists() else []
    models = [(role, args.runs[0], role) for role in ("teacher", "student-init") if role not in {row["model"] for row in old}]
    models += [(run.name, run, "student") for run in args.runs]
    new = []
    for name, run, role in models:
        tokenizer, model, _ = load_run(run, role)
        found = eos_probabilities(model.eval(), tokenizer, records, args.max_length)
        summary = summary_rows(name, found)
        means = {row["metric"]: row["value"] for row in summary if row["statistic"] == "mean"}
        print(name, means, f"{len(found['p_eos_end'])} examples", flush=True)
        new += summary
    rows = merged(old, new)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("model", "metric", "statistic", "value"))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(new)} rows probed, {len(rows)} in {args.out}")


if __name__ == "__main__":
    main()
