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
config) and each run's trained student (its ``checkpoints/last.ckpt``). Every model is
read under bf16 autocast, as the study evaluates them; probabilities in float32.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories whose students to probe")
    parser.add_argument("--examples", type=int, default=200, help="the first N Dolly test examples")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("results/study_eos.csv"))
    args = parser.parse_args()
    records = eval_records("dolly-test", args.examples)
    models = [("teacher", args.runs[0], "teacher"), ("student-init", args.runs[0], "student-init")]
    models += [(run.name, run, "student") for run in args.runs]
    rows = []
    for name, run, role in models:
        tokenizer, model, _ = load_run(run, role)
        found = eos_probabilities(model.eval(), tokenizer, records, args.max_length)
        summary = {metric: torch.tensor(values) for metric, values in found.items()}
        for metric, values in summary.items():
            rows += [(name, metric, "mean", float(values.mean())), (name, metric, "median", float(values.median()))]
        means = {metric: f"{values.mean():.3g}" for metric, values in summary.items()}
        print(name, means, f"{len(found['p_eos_end'])} examples", flush=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("model", "metric", "statistic", "value"))
        writer.writerows((name, metric, statistic, f"{value:.4g}") for name, metric, statistic, value in rows)
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
