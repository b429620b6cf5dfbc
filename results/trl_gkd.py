"""The study's ``trl-gkd`` arm: TRL's own ``GKDTrainer`` (trl.experimental.gkd, TRL 1.16) on the
protocol of the ``gkd`` arm of results/study.py, so that a difference between ``gkd`` (kd_lightning)
and ``trl-gkd`` is a defect to explain, not a protocol difference.

    python results/trl_gkd.py                      # seeds 0 1 2; a seed whose rows exist is skipped
    python results/trl_gkd.py --seeds 0 --runs /tmp/t --cache /tmp/c --rows /tmp/r --prompts 2 --overrides \
        model=tiny '~model.student.layers' trainer.max_steps=2 data.max_train_examples=16 data.max_length=1024  # smoke

``--cache`` must hold ``dolly-test``, the teacher cache results/study.py builds (with the same
``--overrides``); the untrained student is exported to ``--cache/student`` once, as for the cross group.

What TRL's GKD computes per step: with probability λ (``random.random() <= lmbda``) the batch's
responses are replaced by the student's samples for the same prompts (temperature
``GKDConfig.temperature``, top-k 0, top-p 1, ``max_new_tokens``, cut after the first EOS); then
``generalized_jsd_loss``: student and teacher logits divided by τ, log-softmax, the mixture
m = β·p_teacher + (1 − β)·p_student, D = β·KL(teacher ‖ m) + (1 − β)·KL(student ‖ m) per response
token, summed over the tokens that are not masked (labels ≠ −100) and divided by transformers'
``num_items_in_batch`` (the batch's count of response tokens: a mean over the non-masked tokens,
except on sampled batches, below); no τ² factor. kd_lightning's ``jsd`` divergence is the same
formula (tests/test_trl_gkd.py compares the two on the same logits).

The same for both arms, per seed:
- student: the study's untrained student (``study.export_student``: the default teacher's first 12
  and last 3 layers), float32; teacher: ``experiment=study``'s model, frozen, in eval mode;
- examples and order: the record ids of kd-train's first ``trainer.max_steps`` batches (a fresh
  data module's ``train_dataloader()``, the sampler at epoch e for the e-th pass, as Lightning
  sets it), fed to TRL in that order (``train_sampling_strategy="sequential"``), 4 per step, no
  gradient accumulation; ``max_length`` = ``data.max_length``;
- λ = 0.5, β = 0.5, the loss at τ = 1, sampling at temperature 0.9, top-p 1, 128 new tokens,
  ``seq_kd`` off, all read from the composed ``gkd`` arm's config (``policy.lambda``,
  ``divergence.beta``, ``temperature``, ``callbacks.student_responses.*``). TRL 1.16's
  ``compute_loss`` calls ``generalized_jsd_loss`` without a temperature, so its loss is at τ = 1
  whatever ``GKDConfig.temperature`` (the sampling's); the arm is set to match, and an arm config
  with another τ is refused;
- AdamW (the config's lr 2e-4, weight decay, betas and eps; ``optim="adamw_torch"``), the config's
  scheduler (cosine) with round(5% × steps) warm-up steps, gradient clipping at norm 1, 500 steps;
- bf16 mixed precision (autocast, float32 weights); on a CPU without native bf16 the bf16 matmuls
  run as float32 matmuls of the bf16 operands, as in kd-train (``kd_lightning.precision``);
- dropout off (TRL's ``disable_dropout``; the teacher in eval mode); seed = the run's seed; no
  report_to; a checkpoint every ``--save-steps`` steps (the last two kept, deleted once evaluated), from
  which a stopped run resumes (TRL's optimizer, schedule, random generators and data position,
  with the training time and the record ids trained so far: ``Progress``);
- evaluation: ``study.evaluate_model`` on Dolly test, Self-Instruct and Vicuna.

TRL settings that had to be set explicitly (TRL's or transformers' defaults differ): learning_rate
(SFTConfig: 2e-5), activation_checkpointing=False (SFTConfig's gradient_checkpointing: True, which
would also turn off the KV cache in sampling), warmup_steps=round(0.05 × steps) (transformers
rounds a warm-up ratio up, kd_lightning to the nearest), optim="adamw_torch" (the default is the
fused AdamW), train_sampling_strategy="sequential" (random), logging_steps=1, report_to="none",
save_strategy="steps", use_cpu (the study trains on CPUs), max_grad_norm, max_length, lmbda, beta,
temperature, max_new_tokens, seq_kd, disable_dropout (given even where they equal TRL's defaults,
so that the config is their one source), and the student's ``generation_config`` EOS (TRL stops
sampling at the model's EOS, kd_lightning at the tokenizer's: they are made the same).

Where TRL is not run exactly as shipped, and why:
- The tokens. TRL's conversational path (``messages``, rendered by its ``DataCollatorForChatML``)
  cannot reproduce kd_lightning's examples: on seed 0's 2,000 training examples it trains one
  more token on 1,758 (the chat template's newline after ``<|im_end|>``; kd_lightning trains the
  response and EOS), keeps the last 256 tokens of 150 over-long examples (dropping the start of
  the prompt, where kd_lightning cuts the end of the response), and stops with a ValueError on 92
  whose response alone fills 256 tokens. So TRL gets kd_lightning's token ids (``input_ids``,
  ``completion_mask`` = the trained tokens), which the same collator takes as they are: the
  same prompts to sample from and the same trained tokens (its ``prompt`` field, the decoded
  prompt, is read by the collator but not used on this path).

What cannot be matched, and stays TRL's:
- Which batches are sampled: TRL draws from Python's ``random`` (seeded by the Trainer), kd_lightning
  from a generator seeded by the seed and the step; both about λ of the batches, not the same ones,
  and the samples themselves come from different random streams.
- The normaliser of a sampled batch: transformers counts the batch's tokens
  (``num_items_in_batch``) from the dataset's labels before TRL replaces them by the student's
  samples, so a sampled batch's loss is the sum over its sampled tokens divided by the count of
  the dataset's response tokens; kd_lightning divides by the sampled tokens. In the study the
  dataset's responses count a median of 249 tokens per batch of 4 (a mean of 65 per example) and the
  student samples up to 4 × 128 = 512: a sampled batch's loss and gradient weigh up to about
  twice a token mean's, before clipping at norm 1.
- Precision of sampling: TRL samples through the model that accelerate wrapped in bf16 autocast
  (in train mode; dropout is off); kd_lightning samples before the training step, outside
  autocast, in float32, in eval mode.
- Padding: TRL's collator pads on the left (position ids 0, 1, … from the first pad), kd_lightning
  on the right; with rotary positions the same numbers up to rounding.
- kd-train validates every 250 steps; TRL here does not (no effect on training).

Rows: ``--rows/trl-gkd-seed{seed}.csv`` in the study's columns (``policy`` = ``trl-gkd``), with
``train_seconds`` (the wall time of ``trainer.train()``, a resumed run's earlier parts included);
TRL's log per step (loss, grad norm, learning rate, the step's record ids) in ``--rows/logs/``, and
the CPU each part of the training ran on beside it (``trl-gkd-seed{seed}.machines.txt``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import TrainerCallback
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl.experimental.utils import DataCollatorForChatML

from kd_lightning.constants import IGNORE_INDEX
from kd_lightning.models import frozen, load_causal_lm
from kd_lightning.precision import cpu_bf16_matmuls
from study import (ARMS, EVAL_PROMPTS, MACHINES, SEEDS, claim, description, evaluate_model, export_student, record_machine,
                   write_rows)

ARM = "gkd"
POLICY = "trl-gkd"


def arm_config(seed: int, extra: list[str]) -> DictConfig:
    """The composed config of the ``gkd`` arm for ``seed`` (``extra``: further overrides, last)."""
    with initialize_config_module("kd_lightning.conf", version_base="1.3"):
        return compose("train", overrides=["experiment=study", *ARMS[ARM][1], f"seed={seed}", *extra])


def kd_train_order(data, steps: int) -> list[list[int]]:
    """The record ids of kd-train's first ``steps`` batches: the data module's training loader,
    pass after pass, its sampler at epoch e for the e-th pass (as Lightning sets it)."""
    batches: list[list[int]] = []
    for epoch in itertools.count():
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        batches += [batch["record"].tolist() for batch in itertools.islice(loader, steps - len(batches))]
        if len(batches) == steps:
            break
    if short := [step for step, records in enumerate(batches) if len(records) != data.batch_size]:
        raise ValueError(
            f"kd-train's batch {short[0]} has fewer than {data.batch_size} examples (an epoch's last): TRL's batches "
            "are all of one size and cannot reproduce it; choose trainer.max_steps or data.max_train_examples to avoid it"
        )
    return batches


def trl_examples(data, order: list[list[int]]) -> Dataset:
    """kd_lightning's tokens of the examples in ``order``, one row each, in TRL's pre-tokenised
    form: ``input_ids``, ``completion_mask`` (1 on the tokens kd_lightning trains), ``record``."""
    by_record = {example["record"]: example for example in data.train_set}
    rows = []
    for record in itertools.chain.from_iterable(order):
        example = by_record[record]
        trained = [int(label != IGNORE_INDEX) for label in example["labels"]]
        prompt_length = trained.index(1)
        rows.append({
            "record": record,
            "prompt": data.tokenizer.decode(example["input_ids"][:prompt_length]),
            "input_ids": example["input_ids"],
            "attention_mask": example["attention_mask"],
            "completion_mask": trained,
        })
    return Dataset.from_list(rows)


def optimizer_settings(cfg: DictConfig) -> dict:
    """lr, betas, eps and weight decay of the config's optimizer (which must be AdamW), read
    from an instance of it: its defaults included."""
    optimizer = instantiate(cfg.module.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    if type(optimizer) is not torch.optim.AdamW or optimizer.defaults["amsgrad"]:
        raise ValueError(f"only AdamW maps onto TRL's optim='adamw_torch', not {optimizer!r}")
    return {key: optimizer.defaults[key] for key in ("lr", "betas", "eps", "weight_decay")}


def gkd_config(cfg: DictConfig, output_dir: Path, save_steps: int) -> GKDConfig:
    """TRL's settings for the arm of ``cfg``, a checkpoint every ``save_steps`` steps; refuses
    settings TRL's GKD has no equivalent for."""
    sampling = cfg.callbacks.student_responses
    unmatched = {
        "policy (on_policy, no replay buffer)": cfg.policy.name != "on_policy" or sampling.buffer_size != 0,
        "temperature_schedule (constant)": cfg.temperature_schedule != "constant",
        "divergence (TRL's GKD is jsd)": cfg.divergence.name != "jsd",
        "temperature (TRL 1.16's GKD loss is at τ = 1)": cfg.temperature != 1,
        "module.scale_by_tau_sq (TRL has no τ² factor)": cfg.module.scale_by_tau_sq,
        "top_p (TRL samples at top-p 1)": sampling.top_p != 1.0,
        "a CE term (module.ce_weight)": cfg.module.ce_weight != 0,
        "trainer.precision (bf16-mixed or 32-true)": str(cfg.trainer.precision) not in ("bf16-mixed", "32-true", "32"),
        "trainer.gradient_clip_algorithm (norm)": cfg.trainer.get("gradient_clip_algorithm") not in (None, "norm"),
    }
    if refused := [name for name, differs in unmatched.items() if differs]:
        raise ValueError(f"no TRL GKD equivalent for: {', '.join(refused)}")
    optimizer, steps = optimizer_settings(cfg), cfg.trainer.max_steps
    return GKDConfig(
        output_dir=str(output_dir), seed=cfg.seed, max_steps=steps, per_device_train_batch_size=cfg.data.batch_size,
        gradient_accumulation_steps=cfg.trainer.accumulate_grad_batches, train_sampling_strategy="sequential",
        optim="adamw_torch", learning_rate=optimizer["lr"], adam_beta1=optimizer["betas"][0],
        adam_beta2=optimizer["betas"][1], adam_epsilon=optimizer["eps"], weight_decay=optimizer["weight_decay"],
        lr_scheduler_type=cfg.module.lr_scheduler, warmup_steps=round(cfg.module.warmup_ratio * steps),
        max_grad_norm=cfg.trainer.gradient_clip_val, bf16=str(cfg.trainer.precision) == "bf16-mixed",
        use_cpu=cfg.trainer.accelerator == "cpu", activation_checkpointing=cfg.module.gradient_checkpointing,
        max_length=cfg.data.max_length, lmbda=cfg.policy["lambda"], beta=cfg.divergence.beta,
        temperature=sampling.sampling_temperature, max_new_tokens=sampling.max_new_tokens, seq_kd=False,
        disable_dropout=True, logging_steps=1, report_to="none", dataloader_num_workers=0,
        save_strategy="steps", save_steps=save_steps, save_total_limit=2,
    )


class RecordingCollator(DataCollatorForChatML):
    """TRL's collator, keeping the record ids of the examples it is given, in order."""

    def __post_init__(self):
        super().__post_init__()
        self.records: list[int] = []

    def __call__(self, examples: list[dict]) -> dict:
        self.records += [example["record"] for example in examples]
        return super().__call__(examples)


def study_trainer(cfg: DictConfig, student_dir: Path, output_dir: Path, save_steps: int):
    """The trainer of one seed: the exported student, the arm's teacher, kd-train's examples in
    its order; and the data module it read them from."""
    tokenizer = instantiate(cfg.model.tokenizer)
    data = instantiate(cfg.data, tokenizer=tokenizer)
    data.setup()
    examples = trl_examples(data, kd_train_order(data, cfg.trainer.max_steps))
    student = load_causal_lm(str(student_dir), dtype=cfg.model.student.get("dtype", "float32"))
    # TRL stops sampling at the model's EOS, kd_lightning at the tokenizer's
    student.generation_config.eos_token_id = tokenizer.eos_token_id
    config = gkd_config(cfg, output_dir, save_steps)
    trainer = GKDTrainer(
        model=student, teacher_model=frozen(instantiate(cfg.model.teacher)()), args=config, train_dataset=examples,
        processing_class=tokenizer, data_collator=RecordingCollator(tokenizer=tokenizer, max_length=config.max_length),
    )
    return trainer, data


class Progress(TrainerCallback):
    """Training's wall time and the record ids of the batches trained so far, saved beside each
    checkpoint and restored from one: a resumed run counts on (the Trainer skips the batches
    it trained before without collating them again)."""

    FILE = "study_progress.json"

    def __init__(self, collator: RecordingCollator, checkpoint: Path | None):
        self.collator, self.earlier, self.started = collator, 0.0, time.perf_counter()
        if checkpoint is not None:
            saved = json.loads((checkpoint / self.FILE).read_text())
            self.earlier, collator.records = saved["train_seconds"], saved["records"]

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        # the data loader may have collated the next batch already: keep the trained ones
        trained = state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
        progress = {"train_seconds": self.seconds(), "records": self.collator.records[:trained]}
        (Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE).write_text(json.dumps(progress))


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint in ``output_dir`` with its progress saved (a stop between the two leaves one without)."""
    saved = [folder for folder in output_dir.glob("checkpoint-*") if (folder / Progress.FILE).exists()]
    return max(saved, key=lambda folder: int(folder.name.rsplit("-", 1)[1]), default=None)


def bf16_matmuls(config: GKDConfig) -> contextlib.AbstractContextManager:
    """kd-train's context for bf16 work on the CPU (float32 matmuls of bf16 operands where bf16 is emulated)."""
    return cpu_bf16_matmuls("cpu") if config.bf16 and config.use_cpu else contextlib.nullcontext()


def write_log(trainer, path: Path) -> None:
    """TRL's log of every step, with the record ids of the step's examples."""
    size = trainer.args.per_device_train_batch_size
    records = trainer.data_collator.records
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("step", "loss", "grad_norm", "learning_rate", "records"))
        writer.writeheader()
        for entry in (entry for entry in trainer.state.log_history if "loss" in entry):
            step = entry["step"]
            writer.writerow({**{key: entry.get(key) for key in ("step", "loss", "grad_norm", "learning_rate")},
                             "records": " ".join(map(str, records[(step - 1) * size : step * size]))})


def train_seed(seed: int, args) -> Path:
    """Train and evaluate one seed (skipped when its rows exist or another driver holds it); the rows' path."""
    cfg = arm_config(seed, args.overrides)
    name = f"{POLICY}-seed{seed}"
    out = args.rows / f"{name}.csv"
    if out.exists():
        return out
    with claim(args.runs / name) as mine:
        if not mine:
            return out
        # composed with the arm's overrides, which --overrides may change (policy.lambda=1, …)
        student_dir = export_student(args.cache / "student", [*ARMS[ARM][1], *args.overrides])
        trainer, data = study_trainer(cfg, student_dir, args.runs / name, args.save_steps)
        resume = last_checkpoint(args.runs / name)
        progress = Progress(trainer.data_collator, resume)
        record_machine(args.runs / name, resumed=resume is not None)
        trainer.add_callback(progress)
        with bf16_matmuls(trainer.args):
            trainer.train(resume_from_checkpoint=resume and str(resume))
        seconds = progress.seconds()
        write_log(trainer, args.rows / "logs" / f"{name}.csv")
        shutil.copyfile(args.runs / name / MACHINES, args.rows / "logs" / f"{name}.{MACHINES}")
        student = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)  # accelerate's autocast off
        rows = evaluate_model(student, data.tokenizer, args.cache / "dolly-test", args.prompts)
        examples = cfg.trainer.max_steps * cfg.data.batch_size
        described = {**description(ARM, seed, examples), "policy": POLICY}
        write_rows(rows + [("train_seconds", "all", seconds)], described, out)
        print(f"{name}: " + ", ".join(f"{m}/{d}={v:.2f}" for m, d, v in rows), flush=True)
        for checkpoint in (args.runs / name).glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/study"))
    parser.add_argument("--cache", type=Path, default=Path("runs/study-cache"), help="holds dolly-test (study.py builds it)")
    parser.add_argument("--rows", type=Path, default=Path("results/study_runs"), help="one CSV per evaluated run")
    parser.add_argument("--prompts", type=int, default=EVAL_PROMPTS, help="generation prompts per test set")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--save-steps", type=int, default=25, help="a checkpoint every this many steps, to resume from")
    parser.add_argument("--overrides", nargs="*", default=[], help="for every compose (a smoke run: model=tiny …)")
    args = parser.parse_args()
    if not (args.cache / "dolly-test").exists():
        raise SystemExit(f"no teacher cache of Dolly test in {args.cache}: build it with results/study.py first")
    args.rows.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        train_seed(seed, args)


if __name__ == "__main__":
    main()
