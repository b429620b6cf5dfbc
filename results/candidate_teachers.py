"""Candidate cross-family teachers for the cross-tokenizer arms of the study, scored on the
study's generation metrics, so that the teacher is chosen on what the students are scored on.

    python results/candidate_teachers.py --gguf /models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \
        --gguf /models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    python results/candidate_teachers.py --gguf … --datasets dolly-test --sampled-only --rows DIR   # a screening
    python results/candidate_teachers.py --gguf … --bits-per-byte --datasets --rows DIR          # bits per byte only

Each GGUF file is loaded with its own tokenizer and chat template (dequantised to float32,
evaluated under bf16 autocast as every study model) and answers the study's prompts:
sampled and greedy ROUGE-L and the sampled answers' mean length on the first 100 prompts
of Dolly test and Self-Instruct and all 80 of Vicuna (``study.generation_metrics``, the
same seeds). Rows go to ``results/candidate_teachers/NAME.csv`` in the study's columns
(``divergence`` is ``teacher``, ``teacher`` names the model), with the evaluation's wall seconds as metric ``eval_seconds``;
a model whose file exists is skipped. The default teacher's row is ``study_runs/teacher.csv``.
``--bits-per-byte`` adds ``bits_per_byte``: the nats of the first ``--prompts`` Dolly test
references' tokens, each after the model's own prompt, over the references' UTF-8 bytes and
ln 2, comparable across tokenizers (no special tokens added, as kd_lightning feeds every model).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from kd_lightning.data.datamodule import format_prompt
from kd_lightning.evaluation import eval_records
from kd_lightning.models import load_causal_lm, load_tokenizer
from kd_lightning.precision import cpu_bf16_matmuls
from study import EVAL_PROMPTS, EVAL_SETS, description, generation_metrics, write_rows


@torch.no_grad()
def bits_per_byte(model, tokenizer, records: list[dict]) -> float:
    """Σ nats of each reference's tokens after the model's own prompt / Σ the references' UTF-8 bytes / ln 2."""
    nats, size = 0.0, 0
    for record in records:
        prompt = tokenizer(format_prompt(tokenizer, record["instruction"], record.get("input") or ""), add_special_tokens=False)
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([prompt["input_ids"] + response])).logits[0, len(prompt["input_ids"]) - 1 : -1]
        nats += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(response), reduction="sum").item()
        size += len(record["output"].encode())
    return nats / size / math.log(2)


def evaluate_candidate(gguf: Path, out: Path, prompts: int, datasets: tuple[str, ...], greedy: bool, bits: bool) -> None:
    tokenizer = load_tokenizer(str(gguf.parent), gguf_file=gguf.name)
    model = load_causal_lm(str(gguf.parent), gguf_file=gguf.name).eval()
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu_bf16_matmuls("cpu"):
        rows = generation_metrics(model, tokenizer, prompts, datasets, greedy)
    if bits:  # in float32, as the screening's figures
        rows.append(("bits_per_byte", "dolly-test", bits_per_byte(model, tokenizer, eval_records("dolly-test", prompts))))
    rows.append(("eval_seconds", "all", time.perf_counter() - started))
    write_rows(rows, {**description("teacher", 0, 0, teacher=gguf.stem), "teacher_outputs": "live"}, out)
    print(f"{gguf.stem}: " + ", ".join(f"{m}/{d}={v:.2f}" for m, d, v in rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, action="append", required=True, help="a candidate teacher's GGUF file")
    parser.add_argument("--rows", type=Path, default=Path(__file__).parent / "candidate_teachers")
    parser.add_argument("--prompts", type=int, default=EVAL_PROMPTS, help="generation prompts per test set")
    parser.add_argument("--datasets", nargs="*", default=list(EVAL_SETS), help="test sets (a screening: dolly-test; none: no generation)")
    parser.add_argument("--bits-per-byte", action="store_true", help="add bits per byte of the Dolly test references")
    parser.add_argument("--sampled-only", action="store_true", help="sampled ROUGE-L only, no greedy pass")
    args = parser.parse_args()
    args.rows.mkdir(parents=True, exist_ok=True)
    for gguf in args.gguf:
        out = args.rows / f"{gguf.stem}.csv"
        if not out.exists():
            evaluate_candidate(gguf, out, args.prompts, tuple(args.datasets), not args.sampled_only, args.bits_per_byte)


if __name__ == "__main__":
    main()
