"""ROUGE-L by generation on the shipped Dolly, Self-Instruct and Vicuna test sets.

As in the distillation papers: the model answers each instruction (sampling with top-p
1.0 and temperature 1.0 over several seeds, or greedily), and its answer is scored
against the reference with ROUGE-L (F-measure × 100, Porter stemming).

    kd-eval outputs/DATE/TIME                       # the run's student, 3 sets, seeds 1-3
    kd-eval outputs/DATE/TIME --role teacher --greedy --num-examples 50
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import lightning as L
import torch
from rouge_score import rouge_scorer
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from kd_lightning.cli import reported_errors
from kd_lightning.data.datamodule import format_prompt, load_json_lines, resolve_data_path
from kd_lightning.generation import sample_continuations
from kd_lightning.runs import ROLES, describe_run, load_run, run_directory
from kd_lightning.safe_checkpoints import TRUST_CHECKPOINT_HELP

EVAL_SETS = ("dolly-test", "self-inst", "vicuna")
CSV_COLUMNS = ("divergence", "temperature", "selection", "seed", "dataset", "rouge_l", "decoding")
_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``reference``, × 100."""
    return 100 * _SCORER.score(reference, prediction)["rougeL"].fmeasure


def eval_records(name: str, num_examples: int | None = None) -> list[dict]:
    """The first ``num_examples`` records of a shipped evaluation set (or JSON Lines file)."""
    records = load_json_lines(resolve_data_path(name))
    if len(records) == 0:
        raise ValueError(f"the evaluation set {name} is empty")
    return records.select(range(min(len(records), num_examples or len(records)))).to_list()


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
    **sampling,
) -> list[str]:
    """Answers to ``prompts``, generated in batches (``generation.sample_continuations``:
    left padding, KV cache; ``sampling``: do_sample, top_p, temperature), without the prompt."""
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
        encoded = [
            torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            for prompt in prompts[start : start + batch_size]
        ]
        continuations = sample_continuations(
            model, encoded, tokenizer.pad_token_id, tokenizer.eos_token_id, max_new_tokens, **sampling
        )
        answers += tokenizer.batch_decode(continuations, skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    num_examples: int | None = None,
    seed: int | None = 1,
    progress: bool = True,
    **generation,
) -> float:
    """Mean ROUGE-L of ``model`` on ``dataset``; ``seed=None`` generates greedily."""
    records = eval_records(dataset, num_examples)
    prompts = [format_prompt(tokenizer, record["instruction"], record.get("input") or "") for record in records]
    if seed is not None:
        L.seed_everything(seed, verbose=False)
    answers = generate(model, tokenizer, prompts, do_sample=seed is not None, progress=progress, **generation)
    return sum(rouge_l(answer, record["output"]) for answer, record in zip(answers, records)) / len(records)


class RougeEvaluation(L.Callback):
    """Every ``every_n_steps`` training steps, the student answers the first
    ``num_examples`` instructions of each set greedily; logs ``eval/rougeL/<set>``."""

    def __init__(self, every_n_steps: int = 100, datasets=EVAL_SETS, num_examples: int = 20, max_new_tokens: int = 64):
        self.every_n_steps, self.datasets = every_n_steps, list(datasets)
        self.num_examples, self.max_new_tokens = num_examples, max_new_tokens

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps or trainer.global_step == 0:
            return
        tokenizer = trainer.datamodule.tokenizer
        for dataset in self.datasets:
            score = evaluate(
                pl_module.student, tokenizer, dataset, self.num_examples, seed=None, progress=False,
                max_new_tokens=self.max_new_tokens,
            )
            pl_module.log(f"eval/rougeL/{dataset}", score, rank_zero_only=True)


def result_fields(cfg, role: str) -> dict:
    """The result-table fields of a run: its divergence, τ, token selection and training
    seed. Baselines name themselves in the divergence column and have no τ: ``teacher``,
    ``student-init`` (before distillation) and ``ce`` (trained with cross-entropy only)."""
    run = describe_run(cfg)
    if role != "student":
        return {"divergence": role, "temperature": "", "selection": "none", "seed": run["seed"]}
    divergence, temperature = ("ce", "") if run["ce_weight"] == 1 else (run["divergence"], run["temperature"])
    return {"divergence": divergence, "temperature": temperature, "selection": run["selection"], "seed": run["seed"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a kd-train run directory, or a checkpoint inside one")
    parser.add_argument("--role", choices=ROLES, default="student", help="student-init: the student before distillation")
    parser.add_argument("--datasets", nargs="+", default=list(EVAL_SETS))
    parser.add_argument("--num-examples", type=int, default=None, help="default: the whole set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (one row per set)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="CSV to append rows to (default: RUN/rouge.csv)")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_CHECKPOINT_HELP)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with reported_errors("kd-eval", args.debug):
        tokenizer, model, cfg = load_run(args.run, args.role, trust_checkpoint=args.trust_checkpoint)
        out = args.out or run_directory(args.run) / "rouge.csv"
        new_file = not out.is_file()
        with out.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            if new_file:
                writer.writeheader()
            for dataset in args.datasets:
                for seed in [None] if args.greedy else args.seeds:
                    score = evaluate(
                        model, tokenizer, dataset, args.num_examples, seed,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    )
                    decoding = "greedy" if seed is None else f"sampling seed {seed}"
                    writer.writerow({**result_fields(cfg, args.role), "dataset": dataset, "rouge_l": f"{score:.2f}", "decoding": decoding})
                    print(f"{dataset} ({decoding}): ROUGE-L {score:.2f}", flush=True)
        print(f"results: {out}")


if __name__ == "__main__":
    main()
