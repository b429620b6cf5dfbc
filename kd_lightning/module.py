"""The LightningModule that distils a frozen teacher into a trainable student."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

from kd_lightning import losses
from kd_lightning.cache import CachedTeacher
from kd_lightning.data.datamodule import counted_positions
from kd_lightning.losses.base import check_temperature
from kd_lightning.losses.fused import cross_entropy_per_token, token_statistics
from kd_lightning.models import add_lora, decoder_layers, last_hidden_state, lm_head

ModelOrFactory = nn.Module | Callable[..., nn.Module]
TEACHER_PLACEMENTS = ("sharded", "replicated", "offloaded")
NON_FINITE_LOGITS_FIX = {
    "student": "its weights have diverged: lower module.optimizer.lr (and keep trainer.gradient_clip_val), "
    "or resume from an earlier checkpoint",
    "teacher": "the frozen teacher itself is broken: check that it loads correctly and that its dtype does not "
    "overflow (use float32 or bfloat16)",
}


@dataclass
class TokenBatch:
    """What a token policy sees and edits: the counted tokens of one training batch.

    Policies (``DistillationModule.token_policies``) run in order before the loss; each
    may narrow ``keep`` and set a per-token ``temperature``. The module then computes
    the divergence on the kept tokens only, at their temperatures.
    """

    temperature: Tensor  # [N] float32, the base τ to start with
    keep: Tensor  # [N] bool, all True to start with
    step: int  # the trainer's global step
    compute_difficulty: Callable[[], Tensor] = field(repr=False)
    _difficulty: Tensor | None = field(default=None, repr=False)

    def difficulty(self) -> Tensor:
        """Hellinger distance between p and q at τ = 1 per token (SPEC §3), no gradient;
        computed once, on first use."""
        if self._difficulty is None:
            self._difficulty = self.compute_difficulty()
        return self._difficulty


def wants_teacher(factory: Callable[..., nn.Module]) -> bool:
    """Whether a student factory builds the student from the teacher (``teacher=``)."""
    return "teacher" in inspect.signature(factory).parameters


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters held by this process (its shards, under FSDP)."""
    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters()
    )


def _frozen_student_keys(module: nn.Module) -> set[str]:
    """The state-dict keys (under ``student.``) of a LoRA student's frozen base weights."""
    if not module.lora or not hasattr(module, "student"):
        return set()
    return {f"student.{name}" for name, parameter in module.student.named_parameters() if not parameter.requires_grad}


def _drop_teacher_weights(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """The frozen teacher, and a LoRA student's frozen base, are rebuilt from their
    sources, never saved with the trained weights."""
    frozen = {prefix + key for key in _frozen_student_keys(module)}
    for key in [key for key in state_dict if key.startswith(prefix + "teacher.") or key in frozen]:
        del state_dict[key]


def _ignore_missing_teacher(module: nn.Module, incompatible_keys) -> None:
    """Loading a checkpoint leaves the live teacher (and a LoRA student's frozen base) as
    it is: their keys are not missing."""
    missing, frozen = incompatible_keys.missing_keys, _frozen_student_keys(module)
    missing[:] = [key for key in missing if not (key.startswith("teacher.") or ".teacher." in key or key in frozen)]


class DistillationModule(L.LightningModule):
    """Distil a frozen ``teacher`` into a trainable ``student`` (SPEC §1).

    The per-token loss is ``ℓ_i = τ_i² · D_i(p, q)`` (``scale_by_tau_sq``) and the batch
    loss is the mean of ℓ over the response tokens that count (labels ≠ −100, kept by
    the token policies), over the whole global batch. With ``ce_weight = w`` the loss is
    ``(1 − w) · KD + w · CE``.

    Args:
        student, teacher: Hugging Face causal LMs, or callables that build them (called
            in ``configure_model``, so strategies like FSDP can shard them; a student
            factory with a ``teacher`` parameter gets the built teacher).
        divergence: a name from ``losses.available()`` (parameters in
            ``divergence_kwargs``) or a ``losses.Divergence``.
        temperature: τ > 0; token policies may set one per token.
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
            lm_heads; otherwise the module uses the eager one.
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

    The teacher is frozen, kept in eval mode and run under ``torch.no_grad``; the
    optimizer sees only the student; ``state_dict`` and checkpoints hold no teacher weights.
    """

    def __init__(
        self,
        student: ModelOrFactory,
        teacher: ModelOrFactory,
        divergence: str | losses.Divergence = "fkl",
        divergence_kwargs: dict | None = None,
        temperature: float = 1.0,
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
    ):
        super().__init__()
        if loss_impl not in ("fused", "eager"):
            raise ValueError(f"loss_impl must be 'fused' or 'eager', got {loss_impl!r}")
        if teacher_placement not in TEACHER_PLACEMENTS:
            raise ValueError(f"teacher_placement must be one of {', '.join(TEACHER_PLACEMENTS)}, got {teacher_placement!r}")
        if isinstance(divergence, str):
            divergence = losses.get(divergence, **(divergence_kwargs or {}))
        elif divergence_kwargs:
            raise ValueError("divergence_kwargs go with a divergence name, not a Divergence instance")
        check_temperature(temperature)
        if not 0 <= ce_weight <= 1:
            raise ValueError(f"ce_weight must be between 0 and 1, got {ce_weight}")
        if loss_matmul_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"loss_matmul_dtype must be null, bfloat16, float16 or float32, got {loss_matmul_dtype!r}")
        self.loss_matmul_dtype = None if loss_matmul_dtype is None else getattr(torch, loss_matmul_dtype)
        self.divergence = divergence
        self.temperature = float(temperature)
        self.ce_weight, self.scale_by_tau_sq, self.vocab_size = ce_weight, scale_by_tau_sq, vocab_size
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-4)
        self.lr_scheduler, self.warmup_ratio = lr_scheduler, warmup_ratio
        self.loss_impl, self.chunk_size, self.compile_loss = loss_impl, chunk_size, compile_loss
        self.teacher_placement, self.gradient_checkpointing = teacher_placement, gradient_checkpointing
        self.lora = dict(lora) if lora is not None and lora.get("r", 0) > 0 else None
        self.save_hyperparameters(
            {
                "divergence": divergence.name,
                **divergence.hparams(),
                "temperature": temperature,
                "ce_weight": ce_weight,
                "scale_by_tau_sq": scale_by_tau_sq,
                "lr_scheduler": lr_scheduler,
                "warmup_ratio": warmup_ratio,
                "loss_impl": loss_impl,
                "teacher_placement": teacher_placement,
                "lora_r": self.lora["r"] if self.lora else 0,
            }
        )
        self.teacher_factory = self.student_factory = None
        if isinstance(teacher, nn.Module):
            self.teacher = self.frozen(teacher)
        else:
            self.teacher_factory = teacher
        if isinstance(student, nn.Module):
            self.student = student
        else:
            self.student_factory = student
        self.token_policies: list[Callable[[TokenBatch], None]] = []
        self.register_state_dict_post_hook(_drop_teacher_weights)
        self.register_load_state_dict_post_hook(_ignore_missing_teacher)
        self._batch_started_at: float | None = None

    # ------------------------------------------------------------------ models
    @staticmethod
    def frozen(teacher: nn.Module) -> nn.Module:
        return teacher.requires_grad_(False).eval()

    def configure_model(self) -> None:
        """Build the models given as factories (once; Lightning calls this before fit) and,
        under FSDP (a device mesh from ModelParallelStrategy), shard teacher and student
        with ``fully_shard`` per decoder layer, then the rest of each model: the frozen
        teacher is never gathered whole on one rank."""
        if self.teacher_factory is not None and not hasattr(self, "teacher"):
            self.teacher = self.frozen(self.teacher_factory())
        if self.student_factory is not None and not hasattr(self, "student"):
            factory = self.student_factory
            self.student = factory(teacher=self.teacher) if wants_teacher(factory) else factory()
        if self.lora and not hasattr(self.student, "peft_config"):
            self.student = add_lora(self.student, **self.lora)
        if self.gradient_checkpointing and not self.student.is_gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
        if self._device_mesh is not None and not isinstance(self.student, FSDPModule):
            mesh = self._device_mesh["data_parallel"]
            sharded = {"student": {}}
            if self.teacher_placement != "replicated" and not isinstance(self.teacher, CachedTeacher):
                # offloading is to CPU memory: on a CPU run there is nothing to offload
                offload = self.teacher_placement == "offloaded" and self._device_mesh.device_type != "cpu"
                sharded["teacher"] = {"offload_policy": CPUOffloadPolicy()} if offload else {}
            for role, options in sharded.items():
                model = getattr(self, role)
                for layer in decoder_layers(model):
                    fully_shard(layer, mesh=mesh, **options)
                fully_shard(model, mesh=mesh, **options)

    def train(self, mode: bool = True) -> DistillationModule:
        """Switch the student's mode; the teacher stays in eval mode (no dropout)."""
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()
        return self

    def on_fit_start(self) -> None:
        self.student.train()  # Hugging Face models load in eval mode

    def on_train_start(self) -> None:
        """Log the parameter memory each process holds (shards under FSDP)."""
        sizes = {role: local_parameter_bytes(getattr(self, role)) / 2**20 for role in ("teacher", "student")}
        saved = ""
        if isinstance(self.teacher, CachedTeacher):
            saved = f" (its lm_head: the cache saves {self.teacher.live_parameter_bytes / 2**20 - sizes['teacher']:.1f} MiB)"
        # printed, not logged: spawned processes do not inherit Hydra's logging set-up
        print(
            f"process {self.global_rank} of {self.world_size()} holds {sizes['teacher']:.1f} MiB of teacher{saved} "
            f"and {sizes['student']:.1f} MiB of student parameters",
            flush=True,
        )

    # -------------------------------------------------------------------- loss
    def counted_hidden_states(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Student and teacher last hidden states ``[N, H]`` and labels ``[N]`` of the
        counted tokens. Position i predicts token i + 1 (labels are shifted here, as in
        Hugging Face); the teacher runs under ``torch.no_grad``."""
        labels = batch["labels"][:, 1:]
        counted = counted_positions(batch["labels"])
        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        student_hidden = last_hidden_state(self.student, model_inputs)[:, :-1][counted]
        with torch.no_grad():
            teacher_hidden = self.teacher_hidden_states(batch, model_inputs, counted)
        return student_hidden, teacher_hidden, labels[counted]

    def teacher_hidden_states(self, batch: dict, model_inputs: dict, counted: Tensor) -> Tensor:
        """The teacher's final hidden states ``[N, H]`` at the counted positions: from its
        forward pass, or read from a teacher cache by each example's ``record``."""
        if isinstance(self.teacher, CachedTeacher):
            return self.teacher.counted_hidden_states(batch)
        return last_hidden_state(self.teacher, model_inputs)[:, :-1][counted]

    def logits(self, role: str, hidden: Tensor) -> Tensor:
        """``lm_head(hidden)`` of the student or teacher, cut to ``vocab_size``: padding
        beyond the tokenizer carries no token (e.g. 151,936 vs 152,064 rows)."""
        logits = lm_head(getattr(self, role))(hidden)
        return logits if self.vocab_size is None else logits[:, : self.tokenizer_rows(role, logits.shape[-1])]

    def tokenizer_rows(self, role: str, rows: int) -> int:
        """``vocab_size``, after checking that the ``role``'s lm_head has at least that many rows."""
        if rows < self.vocab_size:
            raise ValueError(
                f"the {role} has {rows} logits but the tokenizer has {self.vocab_size} tokens: "
                "teacher and student must share the tokenizer"
            )
        return self.vocab_size

    def global_count(self, count: Tensor) -> Tensor:
        """``count`` summed over all processes (itself outside a multi-process Trainer)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return count
        return self.trainer.strategy.reduce(count, reduce_op="sum")

    def world_size(self) -> int:
        return 1 if self._trainer is None else self.trainer.world_size

    def fused_head_weights(self) -> tuple[Tensor, Tensor] | None:
        """The lm_head weights ``[V, H]`` of student and teacher, cut to ``vocab_size``,
        when the fused loss applies; ``None`` for the eager path."""
        if self.loss_impl != "fused":
            return None
        heads = [lm_head(model) for model in (self.student, self.teacher)]
        if not all(isinstance(head, nn.Linear) and head.bias is None for head in heads):
            return None
        # under FSDP the weights are sharded between forward passes: gather them for the loss
        weights = [head.weight.full_tensor() if isinstance(head.weight, DTensor) else head.weight for head in heads]
        if self.vocab_size is not None:
            weights = [weight[: self.tokenizer_rows(role, len(weight))] for role, weight in zip(("student", "teacher"), weights)]
        return weights[0], weights[1]

    def distillation_losses(self, batch: dict, apply_policies: bool) -> dict[str, Tensor]:
        """The §1 loss and its parts; ``apply_policies`` runs the token policies (training).

        Only kept tokens pay for the student lm_head's backward pass (every counted token
        with ``ce_weight > 0``: the cross-entropy counts them all). Token policies
        judge difficulty from logits computed without gradient (in the fused path, one
        extra chunked pass over both lm_heads).
        """
        student_hidden, teacher_hidden, labels = self.counted_hidden_states(batch)
        policies = self.token_policies if apply_policies else []
        head_weights = self.fused_head_weights()
        if head_weights is None:
            full_gradient = not policies or (self.ce_weight > 0 and torch.is_grad_enabled())
            with torch.set_grad_enabled(torch.is_grad_enabled() and full_gradient):
                student_logits = self.logits("student", student_hidden)
            with torch.no_grad():
                teacher_logits = self.logits("teacher", teacher_hidden)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.ce_weight > 0):
                cross_entropy = cross_entropy_per_token(student_logits, labels)
            compute_difficulty = partial(losses.hellinger, student_logits.detach(), teacher_logits)
        else:
            difficulty = cross_entropy = None  # without policies, the fused pass gives the cross-entropy
            if policies:
                difficulty, cross_entropy = token_statistics(
                    student_hidden.detach(), head_weights[0], teacher_hidden, head_weights[1], labels, self.chunk_size
                )
            compute_difficulty = lambda: difficulty  # noqa: E731
        tokens = TokenBatch(
            temperature=torch.full(labels.shape, self.temperature, device=labels.device),
            keep=torch.ones_like(labels, dtype=torch.bool),
            step=self.global_step if self._trainer is not None else 0,
            compute_difficulty=compute_difficulty,
        )
        for policy in policies:
            policy(tokens)
        keep = tokens.keep
        temperature = tokens.temperature[keep]
        token_weights = temperature.square() if self.scale_by_tau_sq else torch.ones_like(temperature)
        # mean over the global batch: gradients are averaged over processes, so each
        # process contributes its sum scaled by world_size / global count
        scale = self.world_size()
        kd_count = self.global_count(keep.sum()).clamp_min(1)
        ce_count = self.global_count(torch.tensor(labels.numel(), device=labels.device)).clamp_min(1)
        if head_weights is None:
            kept_logits = student_logits[keep] if full_gradient else self.logits("student", student_hidden[keep])
            per_token = self.divergence(kept_logits, teacher_logits[keep], temperature)
        elif self.ce_weight:  # both gradients from one pass over every counted token, at the loss's weights
            loss_weights = torch.zeros_like(tokens.temperature)
            loss_weights[keep] = (1 - self.ce_weight) * scale / kd_count * token_weights
            per_token, cross_entropy = losses.fused_linear_divergence(
                self.divergence, student_hidden, head_weights[0], teacher_hidden, head_weights[1],
                tokens.temperature, self.chunk_size, weights=loss_weights, labels=labels, compile=self.compile_loss,
                ce_weights=self.ce_weight * scale / ce_count, matmul_dtype=self.loss_matmul_dtype,
            )
            per_token = per_token[keep]
        elif cross_entropy is None:  # every token kept: cross-entropy comes from the same pass
            per_token, cross_entropy = losses.fused_linear_divergence(
                self.divergence, student_hidden, head_weights[0], teacher_hidden, head_weights[1],
                temperature, self.chunk_size, weights=token_weights, labels=labels, compile=self.compile_loss,
                matmul_dtype=self.loss_matmul_dtype,
            )
        else:
            per_token = losses.fused_linear_divergence(
                self.divergence, student_hidden[keep], head_weights[0], teacher_hidden[keep], head_weights[1],
                temperature, self.chunk_size, weights=token_weights, compile=self.compile_loss,
                matmul_dtype=self.loss_matmul_dtype,
            )
        kd_loss = (token_weights * per_token).sum() * scale / kd_count
        ce_loss = cross_entropy.sum() * scale / ce_count
        loss = (1 - self.ce_weight) * kd_loss + self.ce_weight * ce_loss if self.ce_weight else kd_loss
        return {
            "loss": loss,
            "kd_loss": kd_loss.detach(),
            "ce_loss": ce_loss.detach(),
            "kept_tokens": keep.sum(),
            "temperature_mean": temperature.mean() if temperature.numel() else torch.tensor(math.nan),
        }

    # ---------------------------------------------------------------- Lightning
    def training_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        out = self.distillation_losses(batch, apply_policies=True)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(self.non_finite_loss_message(batch, out))
        if self._trainer is not None:  # usable outside a Trainer: nothing to log to there
            self.log_dict(
                {"train/loss": out["loss"].detach(), "train/kd_loss": out["kd_loss"], "train/ce_loss": out["ce_loss"]},
                prog_bar=True,
                sync_dist=self.world_size() > 1,
            )
            self.log("temperature/mean", out["temperature_mean"], sync_dist=self.world_size() > 1)
            self.log("selection/kept_tokens", out["kept_tokens"].float(), reduce_fx="sum", sync_dist=self.world_size() > 1)
            if self.trainer.optimizers:
                self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return out

    def non_finite_loss_message(self, batch: dict, out: dict[str, Tensor]) -> str:
        """What made the loss of ``batch`` NaN or +inf, and what to do: the student's logits,
        the teacher's (both recomputed chunk by chunk, without gradient), or else the
        divergence (or the cross-entropy term) on finite logits."""
        value = "NaN" if out["loss"].isnan() else "+inf"
        where = f"the loss is {value} at step {self.global_step}"
        if isinstance(self.student, FSDPModule) and self.world_size() > 1:  # a lone rank must not run FSDP's collectives
            return f"{where}; run on one process to find whether the student's logits, the teacher's or the divergence are"
        with torch.no_grad():
            hidden = dict(zip(("student", "teacher"), self.counted_hidden_states(batch)))
            for role in ("student", "teacher"):
                for chunk in hidden[role].split(self.chunk_size):
                    logits = self.logits(role, chunk)
                    for bad, found in (("NaN", logits.isnan()), ("+inf", logits.isposinf())):
                        if found.any():
                            return f"{where}: the {role}'s logits are {bad}; {NON_FINITE_LOGITS_FIX[role]}"
        if torch.isfinite(out["kd_loss"]):
            return f"{where}: the cross-entropy term is {value}: a label token has a -inf student logit"
        if value == "+inf":
            return (
                f"{where}: the divergence is +inf on finite logits: the student puts mass on tokens the teacher "
                f"rules out (-inf logits), where {self.divergence.name} is infinite; use a bounded divergence "
                "(jsd, tvd, skl, srkl) or give both models the same vocabulary mask"
            )
        return f"{where}: the divergence {self.divergence.name} is NaN on finite logits; try another temperature or divergence"

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
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(
            self.lr_scheduler,
            optimizer,
            num_warmup_steps=round(self.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
