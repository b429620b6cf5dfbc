"""Where the responses come from: the dataset, or the student itself (on-policy).

``StudentResponses`` replaces, for a fraction λ of the training batches, every
example's response with one the student samples for the same prompt; the teacher then
scores those tokens in the module's loss, as in GKD (Agarwal et al., 2024). With a
replay buffer and a λ that rises with the validation loss it is DistiLLM's adaptive
off-policy scheme (Ko et al., 2024).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from kd_lightning.constants import IGNORE_INDEX
from kd_lightning.generation import sample_continuations
from kd_lightning.schedule import total_steps


def split_prompts(batch: dict) -> list[Tensor]:
    """The prompt of each row of a right-padded training batch: the tokens before its
    first counted label (the whole row when none is counted)."""
    if not bool(batch["attention_mask"][:, 0].all()):
        raise ValueError("student-generated responses need right-padded training batches (the tokenizer's padding_side='right')")
    prompts = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        counted = (labels != IGNORE_INDEX).nonzero()
        prompts.append(ids[: int(counted[0]) if len(counted) else int(mask.sum())])
    return prompts


def response_batch(prompts: list[Tensor], responses: list[Tensor], pad_token_id: int) -> dict[str, Tensor]:
    """A right-padded training batch of ``prompt + response`` rows, labels only on the response."""
    width = max(len(prompt) + len(response) for prompt, response in zip(prompts, responses))
    device = prompts[0].device
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.cat([prompt, response.to(device)])
        labels[row, len(prompt) : end] = response
        attention_mask[row, :end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class StudentResponses(L.Callback):
    """Train on the student's own answers for a fraction of the batches.

    Before each training step a uniform draw u (seeded by ``seed`` and the step, so the
    same on every process and after a resume) decides the batch's source:

    - without a buffer (``buffer_size = 0``): if u < λ the student samples a response for
      every prompt of the batch (``max_new_tokens``, ``sampling_temperature``, ``top_p``; eval mode,
      KV cache, no gradient), which replaces the dataset's response; the prompt is kept
      and stays out of the loss. λ = 0 is offline distillation, λ = 1 fully on-policy.
    - with a replay buffer (DistiLLM): if u < λ·(1 − t/T) (t the step, T the run's
      steps), or u < λ while the buffer is not full, fresh samples are generated and
      stored in the buffer (the oldest leave it); else if u < λ the batch is drawn from
      the buffer; else it is the dataset's.
    - ``loss_margin`` set: after each validation, if the validation loss rose by at least
      ``loss_margin`` since the last change, λ ← min(1, λ + ``increase``).

    Every process generates for its own share of the batch. The buffer and λ are saved
    in checkpoints. Logs ``policy/on_policy_fraction`` (1 for a student-generated batch),
    ``policy/lambda``, ``policy/buffer_size`` and ``policy/gen_tokens_per_s``.
    """

    def __init__(
        self,
        probability: float = 1.0,
        max_new_tokens: int = 128,
        sampling_temperature: float = 1.0,
        top_p: float = 1.0,
        buffer_size: int = 0,
        loss_margin: float | None = None,
        increase: float = 0.1,
        seed: int = 0,
    ):
        if not 0 <= probability <= 1:
            raise ValueError(f"the on-policy probability lambda must be between 0 and 1, got {probability}")
        if max_new_tokens < 1 or buffer_size < 0:
            raise ValueError(f"max_new_tokens must be ≥ 1 and buffer_size ≥ 0, got {max_new_tokens} and {buffer_size}")
        self.probability, self.max_new_tokens, self.top_p = probability, max_new_tokens, top_p
        self.sampling_temperature = sampling_temperature  # the student's sampling, not the distillation τ
        self.buffer_size, self.loss_margin, self.increase, self.seed = buffer_size, loss_margin, increase, seed
        self.buffer: list[tuple[Tensor, Tensor]] = []  # (prompt, response) pairs on the CPU
        self.reference_val_loss: float | None = None

    def source(self, step: int, run_steps: int) -> tuple[str, torch.Generator]:
        """``"generate"``, ``"replay"`` or ``"dataset"`` for this step, and the step's generator."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draw = float(torch.rand((), generator=generator))
        if not self.buffer_size:
            return ("generate" if draw < self.probability else "dataset"), generator
        fresh = self.probability * (1 - step / max(run_steps, 1))
        if draw < fresh or (draw < self.probability and len(self.buffer) < self.buffer_size):
            return "generate", generator
        if draw < self.probability and self.buffer:
            return "replay", generator
        return "dataset", generator

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        source, generator = self.source(trainer.global_step, total_steps(trainer))
        if source == "generate":
            prompts = split_prompts(batch)
            tokenizer = trainer.datamodule.tokenizer
            started = time.perf_counter()
            responses = sample_continuations(
                pl_module.student, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, self.max_new_tokens,
                temperature=self.sampling_temperature, top_p=self.top_p, synced_gpus=isinstance(pl_module.student, FSDPModule),
            )
            generated = sum(len(response) for response in responses)
            pl_module.log("policy/gen_tokens_per_s", generated / (time.perf_counter() - started))
            if self.buffer_size:
                self.buffer = (self.buffer + [(p.cpu(), r.cpu()) for p, r in zip(prompts, responses)])[-self.buffer_size :]
            batch.update(response_batch(prompts, responses, tokenizer.pad_token_id))
        elif source == "replay":
            size = len(batch["input_ids"])
            picks = torch.randperm(len(self.buffer), generator=generator)[:size].tolist()
            device = batch["input_ids"].device
            prompts = [self.buffer[i][0].to(device) for i in picks]
            responses = [self.buffer[i][1] for i in picks]
            batch.update(response_batch(prompts, responses, trainer.datamodule.tokenizer.pad_token_id))
        pl_module.log("policy/on_policy_fraction", float(source != "dataset"))
        pl_module.log("policy/lambda", self.probability)
        if self.buffer_size:
            pl_module.log("policy/buffer_size", float(len(self.buffer)))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.loss_margin is None or trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        val_loss = float(trainer.callback_metrics["val/loss"])
        if self.reference_val_loss is None:
            self.reference_val_loss = val_loss
        elif val_loss >= self.reference_val_loss + self.loss_margin:
            self.probability = min(1.0, self.probability + self.increase)
            self.reference_val_loss = val_loss

    def state_dict(self) -> dict[str, Any]:
        return {"probability": self.probability, "reference_val_loss": self.reference_val_loss, "buffer": self.buffer}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probability, self.reference_val_loss = state_dict["probability"], state_dict["reference_val_loss"]
        self.buffer = list(state_dict["buffer"])
