"""What the student answers while it trains, next to what the teacher answers.

``SampleAnswers`` has the teacher and the student answer a fixed set of prompts every
few steps and writes them side by side with the step and τ: a W&B Table when the run
logs to W&B, ``samples.csv`` in the run directory otherwise.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.distributed.fsdp import FSDPModule

from kd_lightning.data.datamodule import format_prompt
from kd_lightning.evaluation import eval_records, generate

log = logging.getLogger(__name__)

COLUMNS = ("step", "temperature", "prompt", "teacher", "student", "decoding")
#: the teacher column of a run without a live teacher
NO_LIVE_TEACHER = "(no live teacher: this run reads the teacher's outputs from a cache, which cannot generate)"
WANDB_KEY = "samples/answers"


class SampleAnswers(L.Callback):
    """Every ``every_n_steps`` training steps, before the first and after the last, the
    teacher and the student answer the first ``num_prompts`` instructions of ``dataset``
    (a shipped evaluation set or a JSON Lines file), greedily, up to ``max_new_tokens``
    new tokens each (eval mode, KV cache, no gradient: ``evaluation.generate``).

    One row per prompt: ``step, temperature, prompt, teacher, student, decoding``, where
    ``prompt`` is the instruction (and its input), ``temperature`` is the distillation τ at that step and ``decoding`` states the
    generation settings. The rows go to a W&B Table (``samples/answers``, every row so
    far) when a ``WandbLogger`` is among the run's loggers, else to ``out_dir/samples.csv``;
    a resumed run replaces the rows from its first step on. The frozen teacher's greedy
    answers do not change, so they are generated once. A run that trains from a teacher
    cache has no teacher that can generate: its teacher column says so.
    """

    def __init__(self, out_dir: str | Path, every_n_steps: int = 100, dataset: str = "dolly-test",
                 num_prompts: int = 4, max_new_tokens: int = 64):
        if every_n_steps < 1 or num_prompts < 1 or max_new_tokens < 1:
            raise ValueError(
                f"every_n_steps, num_prompts and max_new_tokens must be ≥ 1, got {every_n_steps}, {num_prompts}, {max_new_tokens}"
            )
        self.csv_path = Path(out_dir) / "samples.csv"
        self.every_n_steps, self.dataset = every_n_steps, dataset
        self.num_prompts, self.max_new_tokens = num_prompts, max_new_tokens
        self.decoding = f"greedy, at most {max_new_tokens} new tokens"
        self.instructions: list[str] = []  # what the prompt column shows: the instruction and its input
        self.prompts: list[str] = []  # what the models read: the instruction in the prompt template
        self.teacher_answers: list[str] = []
        self.wandb_rows: list[list] = []
        self.last_sampled_step: int | None = None
        self.samplings = 0
        self.seconds = 0.0  # spent generating, teacher and student

    def answers(self, model: nn.Module, tokenizer) -> list[str]:
        """``model``'s greedy answers to the prompts (every process steps along under FSDP);
        the time it takes is added to ``seconds``."""
        started = time.perf_counter()
        answers = generate(
            model, tokenizer, self.prompts, self.max_new_tokens, progress=False,
            do_sample=False, synced_gpus=isinstance(model, FSDPModule),
        )
        self.seconds += time.perf_counter() - started
        return answers

    def load_prompts(self, tokenizer) -> None:
        """The first ``num_prompts`` records of ``dataset``: their instructions, and the prompts the models read."""
        records = eval_records(self.dataset, self.num_prompts)
        self.instructions = [f"{record['instruction']}\n\n{record.get('input') or ''}".strip() for record in records]
        self.prompts = [format_prompt(tokenizer, record["instruction"], record.get("input") or "") for record in records]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokenizer = trainer.datamodule.tokenizer
        self.load_prompts(tokenizer)
        if hasattr(pl_module.teacher, "generate"):
            self.teacher_answers = self.answers(pl_module.teacher, tokenizer)
        else:
            log.info("sample answers: the student's only; the teacher is read from a cache and cannot generate")
            self.teacher_answers = [NO_LIVE_TEACHER] * len(self.prompts)
        if trainer.is_global_zero and self.csv_path.is_file():
            self.drop_rows_from(trainer.global_step)
        self.sample(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sample(trainer, pl_module)
        log.info("sample answers: %.1f s generating (the student %d times, a live teacher once)", self.seconds, self.samplings)

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The student's answers at this step, with the teacher's, written as rows (once a step)."""
        step = trainer.global_step
        if step == self.last_sampled_step:
            return
        self.last_sampled_step, self.samplings = step, self.samplings + 1
        student_answers = self.answers(pl_module.student, trainer.datamodule.tokenizer)
        if not trainer.is_global_zero:
            return
        temperature = round(float(pl_module.temperature), 6)
        rows = [
            [step, temperature, prompt, teacher, student, self.decoding]
            for prompt, teacher, student in zip(self.instructions, self.teacher_answers, student_answers)
        ]
        wandb_logger = next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)
        if wandb_logger is not None:
            self.wandb_rows += rows  # a W&B Table is logged whole: every row so far
            wandb_logger.log_table(WANDB_KEY, columns=list(COLUMNS), data=self.wandb_rows, step=step)
        else:
            self.append_csv(rows)

    def append_csv(self, rows: list[list]) -> None:
        new_file = not self.csv_path.is_file()
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with self.csv_path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(COLUMNS)
            writer.writerows(rows)

    def drop_rows_from(self, first_step: int) -> None:
        """Keep only the rows of ``samples.csv`` before ``first_step``, where a resumed run starts again."""
        with self.csv_path.open(newline="") as handle:
            kept = [row for row in csv.DictReader(handle) if int(row["step"]) < first_step]
        with self.csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
