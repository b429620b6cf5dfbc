"""The LightningModule that distils a frozen teacher into a trainable student."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from functools import partial

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from transformers import get_scheduler

from kd_lightning import losses
from kd_lightning.cache import StoredTeacher
from kd_lightning.checkpoints import drop_teacher_weights, ignore_missing_teacher
from kd_lightning.cross_tokenizer import CrossTokenizer
from kd_lightning.diagnostics import non_finite_loss_message, print_parameter_memory
from kd_lightning.frozen_teacher import hide_frozen_teacher_warning, remove_warning_filter
from kd_lightning.heads import CountedStates, EagerHead, FusedHead, GlobalMean, LmHeads, LossHead, counted_states
from kd_lightning.models import add_lora, build_student, frozen, shard_by_layer, shard_teacher
from kd_lightning.schedule import as_schedule, total_steps
from kd_lightning.tokens import TokenBatch, active_policies

ModelOrFactory = nn.Module | Callable[..., nn.Module]
TEACHER_PLACEMENTS = ("sharded", "replicated", "offloaded")


def check_settings(loss_impl: str, teacher_placement: str, ce_weight: float, loss_matmul_dtype: str | None) -> None:
    """Raise ``ValueError`` naming the first setting of the module that is out of range."""
    if loss_impl not in ("fused", "eager"):
        raise ValueError(f"loss_impl must be 'fused' or 'eager', got {loss_impl!r}")
    if teacher_placement not in TEACHER_PLACEMENTS:
        raise ValueError(f"teacher_placement must be one of {', '.join(TEACHER_PLACEMENTS)}, got {teacher_placement!r}")
    if not 0 <= ce_weight <= 1:
        raise ValueError(f"ce_weight must be between 0 and 1, got {ce_weight}")
    if loss_matmul_dtype not in (None, "bfloat16", "float16", "float32"):
        raise ValueError(f"loss_matmul_dtype must be null, bfloat16, float16 or float32, got {loss_matmul_dtype!r}")


class DistillationModule(L.LightningModule):
    """Distil a frozen ``teacher`` into a trainable ``student`` (SPEC §1).

    The per-token loss is ``ℓ_i = τ_i² · D_i(p, q)`` (``scale_by_tau_sq``) and the batch
    loss is the mean of ℓ over the response tokens that count (labels ≠ −100, kept by
    the token policies), over the whole global batch. With ``ce_weight = w`` the loss is
    ``(1 − w) · KD + w · CE``. Its parts are in ``heads``: the teacher's source (a live
    model or a cache), and a loss head (eager or fused) that gives the token statistics
    the policies judge by and the divergence of the kept tokens.

    Args:
        student, teacher: Hugging Face causal LMs, or callables that build them (called
            in ``configure_model``, so strategies like FSDP can shard them; a student
            factory with a ``teacher`` parameter gets the built teacher).
        divergence: a name from ``losses.available()`` (parameters in
            ``divergence_kwargs``) or a ``losses.Divergence``.
        temperature: τ > 0: a number, a ``schedule.TemperatureSchedule`` (constant,
            linear or cosine over the run) or any callable of the step. The module
            reads τ from it every step; token policies may then set one per token.
        vocab_size: the tokenizer's size; logits are cut to it, which aligns models whose
            embeddings are padded differently (e.g. 151,936 vs 152,064).
        optimizer: a callable taking the student's parameters (default AdamW, lr 1e-4).
        lr_scheduler: a ``transformers.get_scheduler`` name (``cosine``, ``linear``,
            ``constant_with_warmup``, …) stepped every optimizer step, with
            ``warmup_ratio`` of the run spent warming up.
        loss_impl: ``fused`` (default): lm_head and divergence chunk by chunk
            (``losses.fused_linear_divergence``), never the full logits of either model;
            ``eager``: the logits of the counted tokens, then the divergence. The fused
            path (the cross-entropy of ``ce_weight`` included) needs bias-free linear
            lm_heads; otherwise the module uses the eager one. Across tokenizers, ``fused``
            computes the groups' gradients in the forward pass and ``eager`` recomputes each
            chunk in the backward pass (``cross_tokenizer.CrossTokenizerHead``).
        chunk_size: tokens per chunk of the fused path: chunk_size × V floats per
            intermediate (256 × 151,936 × 4 B = 156 MB).
        compile_loss: fuse each chunk's passes over the vocabulary with ``torch.compile``
            (several times less elementwise work; the first step compiles).
        loss_matmul_dtype: ``bfloat16``: the fused path's logit and gradient matmuls in
            bf16 (fast on CPUs with bf16 matrix units), accumulators and the divergence
            in float32; ``None`` (default): the lm_heads' own dtype.
        teacher_placement: under FSDP, ``sharded`` (default: per decoder layer, like the
            student), ``replicated`` (a whole copy per process: no gathers, most memory)
            or ``offloaded`` (sharded, and kept in CPU memory between uses; on CPU runs
            the same as ``sharded``).
        gradient_checkpointing: recompute the student's activations in the backward pass
            (Hugging Face gradient checkpointing): less memory, about a third more compute.
        lora: LoRA settings for the student (``models.add_lora``: ``r``, ``alpha``,
            ``dropout``, ``target_modules``); with ``r > 0`` only the adapters train, and
            checkpoints hold only them. ``None`` or ``r = 0``: the whole student trains.
        cross_tokenizer: a teacher with another tokenizer (``cross_tokenizer.CrossTokenizer``): the loss
            runs over aligned groups of batches from ``CrossTokenizerDataModule``.

    The teacher is frozen, kept in eval mode and run under ``torch.no_grad``; the
    optimizer sees only the student; ``state_dict`` and checkpoints hold no teacher weights.
    """

    def __init__(
        self,
        student: ModelOrFactory,
        teacher: ModelOrFactory,
        divergence: str | losses.Divergence = "fkl",
        divergence_kwargs: dict | None = None,
        temperature: float | Callable = 1.0,
        ce_weight: float = 0.0,
        scale_by_tau_sq: bool = True,
        vocab_size: int | None = None,
        optimizer: Callable | None = None,
        lr_scheduler: str = "cosine",
        warmup_ratio: float = 0.05,
        loss_impl: str = "fused",
        chunk_size: int = 256,
        compile_loss: bool = False,
        loss_matmul_dtype: str | None = None,
        teacher_placement: str = "sharded",
        gradient_checkpointing: bool = False,
        lora: Mapping | None = None,
        cross_tokenizer: CrossTokenizer | None = None,
    ):
        super().__init__()
        check_settings(loss_impl, teacher_placement, ce_weight, loss_matmul_dtype)
        divergence = losses.resolve(divergence, divergence_kwargs)
        self.loss_matmul_dtype = None if loss_matmul_dtype is None else getattr(torch, loss_matmul_dtype)
        self.divergence, self.temperature_schedule, self.cross_tokenizer = divergence, as_schedule(temperature), cross_tokenizer
        self.ce_weight, self.scale_by_tau_sq, self.vocab_size = ce_weight, scale_by_tau_sq, vocab_size
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-4)
        self.lr_scheduler, self.warmup_ratio = lr_scheduler, warmup_ratio
        self.loss_impl, self.chunk_size, self.compile_loss = loss_impl, chunk_size, compile_loss
        self.teacher_placement, self.gradient_checkpointing = teacher_placement, gradient_checkpointing
        self.lora = dict(lora) if lora is not None and lora.get("r", 0) > 0 else None
        self.save_hyperparameters({
            "divergence": divergence.name, **divergence.hparams(), **self.temperature_schedule.hparams(), "ce_weight": ce_weight,
            "scale_by_tau_sq": scale_by_tau_sq, "lr_scheduler": lr_scheduler, "warmup_ratio": warmup_ratio, "loss_impl": loss_impl,
            "teacher_placement": teacher_placement, "lora_r": self.lora["r"] if self.lora else 0,
            "cross_tokenizer": getattr(cross_tokenizer, "name", "none")})  # cross_tokenizer: SPEC §6's objective, or none
        # models given as factories are built in configure_model
        self.teacher_factory = None if isinstance(teacher, nn.Module) else teacher
        self.student_factory = None if isinstance(student, nn.Module) else student
        if self.teacher_factory is None:
            self.teacher = frozen(teacher)
        if self.student_factory is None:
            self.student = student
        self.token_policies: list[Callable[[TokenBatch], None]] = []  # besides the trainer's TokenPolicy callbacks
        self.run_steps: int | None = None  # the fit's optimizer steps, once fitting
        self.register_state_dict_post_hook(drop_teacher_weights)
        self.register_load_state_dict_post_hook(ignore_missing_teacher)
        self._batch_started_at: float | None = None

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        """Build the models given as factories (once; Lightning calls this before fit) and,
        under FSDP (a device mesh from ModelParallelStrategy), shard teacher and student
        with ``fully_shard`` per decoder layer, then the rest of each model: the frozen
        teacher is never gathered whole on one rank."""
        if self.teacher_factory is not None and not hasattr(self, "teacher"):
            self.teacher = frozen(self.teacher_factory())
        if self.student_factory is not None and not hasattr(self, "student"):
            self.student = build_student(self.student_factory, self.teacher)
        if self.lora and not hasattr(self.student, "peft_config"):
            self.student = add_lora(self.student, **self.lora)
        if self.gradient_checkpointing and not self.student.is_gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
        if self._device_mesh is not None and not isinstance(self.student, FSDPModule):
            shard_by_layer(self.student, self._device_mesh["data_parallel"])
            if self.teacher_placement != "replicated" and not isinstance(self.teacher, StoredTeacher):
                shard_teacher(self.teacher, self._device_mesh, offload=self.teacher_placement == "offloaded")

    def train(self, mode: bool = True) -> DistillationModule:
        """Switch the student's mode; the teacher stays in eval mode (no dropout)."""
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()
        return self

    def on_fit_start(self) -> None:
        self.student.train()  # Hugging Face models load in eval mode
        self.run_steps = total_steps(self.trainer)
        self._eval_mode_warning_filter = hide_frozen_teacher_warning(self)  # the teacher is in eval mode on purpose

    def on_train_start(self) -> None:
        remove_warning_filter(self._eval_mode_warning_filter)  # Lightning checked the modes just before this hook
        print_parameter_memory(self)

    # -------------------------------------------------------------------- loss
    @property
    def temperature(self) -> float:
        """τ at this step, from the temperature schedule (its start outside a fit)."""
        return self.temperature_schedule(self.global_step, self.run_steps or 1)

    def world_size(self) -> int:
        return 1 if self._trainer is None else self.trainer.world_size

    def global_count(self, count: Tensor) -> Tensor:
        """``count`` summed over all processes, at least 1."""
        if self.world_size() > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        return count.clamp_min(1)

    def loss_head(self, states: CountedStates, selective: bool) -> LossHead:
        """The fused head where it applies (``loss_impl="fused"`` and bias-free linear
        lm_heads, the cross-entropy of ``ce_weight`` included; a top-k cache always), else the eager one."""
        lm_heads = LmHeads.of(self.student, self.teacher, self.vocab_size)
        fused_inputs = lm_heads.fused_inputs(states.teacher, fused=self.loss_impl == "fused")
        if fused_inputs is None:
            return EagerHead(self.divergence, self.ce_weight, states, selective, lm_heads)
        return FusedHead(
            self.divergence, self.ce_weight, states, selective, *fused_inputs,
            chunk_size=self.chunk_size, compile=self.compile_loss, matmul_dtype=self.loss_matmul_dtype,
        )

    def distillation_losses(self, batch: dict, apply_policies: bool) -> dict[str, Tensor]:
        """The §1 loss and its parts; ``apply_policies`` runs the token policies (training).

        The teacher's states, a loss head over the counted tokens, the policies' edits of
        a per-token copy of τ and of the kept set, then D of the kept tokens at their τ.
        """
        policies = active_policies(self.token_policies, self._trainer) if apply_policies else []
        if self.cross_tokenizer is None:
            head = self.loss_head(counted_states(self.student, self.teacher, batch), selective=bool(policies))
        else:  # the groups' head: each side runs on its own tokens
            head = self.cross_tokenizer.head(self.student, self.teacher, batch, self.divergence, self.ce_weight,
                                             chunk_size=self.chunk_size, loss_impl=self.loss_impl)
        labels = head.labels
        tokens = TokenBatch(  # one entry per loss unit: a counted token, or an aligned group
            temperature=torch.full((head.units,), self.temperature, device=labels.device),
            keep=torch.ones(head.units, dtype=torch.bool, device=labels.device),
            step=self.global_step,
            compute_difficulty=head.difficulty,
        )
        for policy in policies:
            policy(tokens)
        counted = torch.tensor(labels.numel(), device=labels.device)
        mean = GlobalMean(self.world_size(), self.global_count(tokens.keep.sum()), self.global_count(counted))
        weights = tokens.loss_weights(self.scale_by_tau_sq and head.scaled_by_tau_sq)
        per_token, cross_entropy = head.kept_losses(tokens, weights, mean)
        kd_loss, ce_loss = mean.kd(weights * per_token), mean.ce(cross_entropy)
        kept_temperature = tokens.temperature[tokens.keep]
        return {
            "loss": (1 - self.ce_weight) * kd_loss + self.ce_weight * ce_loss if self.ce_weight else kd_loss,
            "kd_loss": kd_loss.detach(),
            "ce_loss": ce_loss.detach(),
            "kept_tokens": tokens.keep.sum(),
            "temperature_mean": kept_temperature.mean() if kept_temperature.numel() else torch.tensor(math.nan),
        }

    # ---------------------------------------------------------------- Lightning
    def training_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        out = self.distillation_losses(batch, apply_policies=True)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(non_finite_loss_message(self, batch, out))
        if self._trainer is not None:  # usable outside a Trainer: nothing to log to there
            synced = self.world_size() > 1
            self.log_dict(
                {"train/loss": out["loss"].detach(), "train/kd_loss": out["kd_loss"], "train/ce_loss": out["ce_loss"]},
                prog_bar=True,
                sync_dist=synced,
            )
            self.log("temperature/mean", out["temperature_mean"], sync_dist=synced)
            self.log("selection/kept_tokens", out["kept_tokens"].float(), reduce_fx="sum", sync_dist=synced)
            if self.trainer.optimizers:
                self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        out = self.distillation_losses(batch, apply_policies=False)
        if self._trainer is not None:
            self.log_dict(
                {"val/loss": out["loss"], "val/kd_loss": out["kd_loss"], "val/ce_loss": out["ce_loss"]},
                prog_bar=True,
                sync_dist=self.world_size() > 1,
                batch_size=int(out["kept_tokens"]),
            )
        return out

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._batch_started_at = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """Log tokens per second (all tokens of the global batch, prompt included)."""
        elapsed = time.perf_counter() - self._batch_started_at
        tokens = int(batch["attention_mask"].sum()) * self.world_size()
        self.log("train/tokens_per_s", tokens / elapsed, prog_bar=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([parameter for parameter in self.student.parameters() if parameter.requires_grad])
        steps = total_steps(self.trainer)
        scheduler = get_scheduler(
            self.lr_scheduler, optimizer, num_warmup_steps=round(self.warmup_ratio * steps), num_training_steps=steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
