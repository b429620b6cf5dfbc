"""From a batch to the parts of the §1 loss: teacher sources and loss heads.

Teacher sources. ``counted_states`` takes the final hidden states of the counted tokens
from the student's forward pass and the teacher's outputs for them from its source: a
live model's forward pass (hidden states), or any stored source with
``counted_outputs(batch)``: hidden states ``[N, H]`` beside an ``lm_head`` (the exact
cache, ``cache.CachedTeacher``) or ``losses.TopKTargets`` (the top-k cache,
``topk_cache.TopKCachedTeacher``, which has no lm_head). A new source is one such class.

Loss heads. A head is built per batch from those states and offers, in order:
``difficulty()``, the Hellinger distance at τ = 1 per token (for token policies), then
``kept_losses(tokens, weights, mean)``, D of the kept tokens at their temperatures and
the cross-entropy of every counted token, both ready to backpropagate. ``EagerHead``
computes both models' logits of the counted tokens and uses autograd; ``FusedHead``
runs ``losses.fused_divergence``, chunk by chunk, never the full logits; it is the one
head that serves top-k targets. A new head is one new class with those two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from kd_lightning import losses
from kd_lightning.data.datamodule import counted_positions
from kd_lightning.losses.fused import cross_entropy_per_token, token_statistics
from kd_lightning.models import last_hidden_state, lm_head
from kd_lightning.tokens import TokenBatch


@dataclass
class CountedStates:
    """The counted tokens of a batch: both models' final hidden states and the labels."""

    student: Tensor  # [N, Hs], with gradient
    teacher: Tensor | losses.TopKTargets  # [N, Ht] hidden states, or top-k targets; without gradient
    labels: Tensor  # [N]


def hidden_states(model: nn.Module, batch: dict) -> Tensor:
    """``[N, H]``: ``model``'s final hidden states at the counted positions, from its
    forward pass (position i predicts token i + 1: labels shift here, as in Hugging Face)
    or, for a stored source, its outputs read by each example's ``record``."""
    if hasattr(model, "counted_outputs"):
        return model.counted_outputs(batch)
    model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    return last_hidden_state(model, model_inputs)[:, :-1][counted_positions(batch["labels"])]


def counted_states(student: nn.Module, teacher: nn.Module, batch: dict) -> CountedStates:
    """The counted tokens of ``batch``; the teacher runs under ``torch.no_grad``."""
    student_hidden = hidden_states(student, batch)
    with torch.no_grad():
        teacher_hidden = hidden_states(teacher, batch)
    return CountedStates(student_hidden, teacher_hidden, batch["labels"][:, 1:][counted_positions(batch["labels"])])


@dataclass
class LmHeads:
    """The student's and the teacher's lm_heads, with logits cut to the tokenizer's
    ``vocab_size``: rows beyond it are padding and carry no token (e.g. 151,936 vs 152,064).
    A teacher source of top-k targets has no lm_head (``teacher`` is None)."""

    student: nn.Module
    teacher: nn.Module | None
    vocab_size: int | None = None

    @classmethod
    def of(cls, student: nn.Module, teacher: nn.Module, vocab_size: int | None) -> LmHeads:
        return cls(lm_head(student), lm_head(teacher), vocab_size)

    def logits(self, role: str, hidden: Tensor) -> Tensor:
        """``lm_head(hidden)`` of the ``student`` or ``teacher``, cut to ``vocab_size``."""
        logits = getattr(self, role)(hidden)
        return logits if self.vocab_size is None else logits[:, : self.tokenizer_rows(role, logits.shape[-1])]

    def tokenizer_rows(self, role: str, rows: int) -> int:
        """``vocab_size``, after checking that the ``role``'s lm_head has at least that many rows."""
        if rows < self.vocab_size:
            raise ValueError(
                f"the {role} has {rows} logits but the tokenizer has {self.vocab_size} tokens: "
                "teacher and student must share the tokenizer"
            )
        return self.vocab_size

    def fused_weights(self) -> dict[str, Tensor] | None:
        """The weights ``[V, H]`` of the lm_heads there are (``student``, ``teacher``), cut to
        ``vocab_size``, when all are bias-free linear layers (what the fused head needs); else ``None``."""
        heads = {role: head for role, head in (("student", self.student), ("teacher", self.teacher)) if head is not None}
        if not all(isinstance(head, nn.Linear) and head.bias is None for head in heads.values()):
            return None
        # under FSDP the weights are sharded between forward passes: gather them for the loss
        weights = {role: head.weight for role, head in heads.items()}
        weights = {role: weight.full_tensor() if isinstance(weight, DTensor) else weight for role, weight in weights.items()}
        if self.vocab_size is not None:
            weights = {role: weight[: self.tokenizer_rows(role, len(weight))] for role, weight in weights.items()}
        return weights

    def fused_inputs(self, teacher_outputs: Tensor | losses.TopKTargets, fused: bool) -> tuple | None:
        """``(student_weight, targets)`` for the fused head, or ``None`` for the eager one:
        the fused head serves ``fused`` runs whose lm_heads allow it, and top-k targets always."""
        weights = self.fused_weights() if fused or isinstance(teacher_outputs, losses.TopKTargets) else None
        if isinstance(teacher_outputs, losses.TopKTargets):
            if weights is None:
                raise ValueError(
                    "a top-k teacher cache is served by the fused loss, which needs a student lm_head that is a "
                    f"bias-free linear layer (this student's: {self.student}); use an exact cache (cache.format=exact)"
                )
            return weights["student"], teacher_outputs
        if weights is None:
            return None
        return weights["student"], losses.LinearTargets(teacher_outputs, weights["teacher"])


@dataclass
class GlobalMean:
    """The §1 means run over the global batch: gradients are averaged over processes, so
    each process contributes its sum × ``world_size`` / the global count."""

    world_size: int
    kd_count: Tensor  # kept tokens of the global batch (at least 1)
    ce_count: Tensor  # counted tokens of the global batch (at least 1)

    def kd(self, values: Tensor) -> Tensor:
        return values.sum() * self.world_size / self.kd_count

    def ce(self, values: Tensor) -> Tensor:
        return values.sum() * self.world_size / self.ce_count


class LossHead(Protocol):
    """What the module asks of a loss head, in this order, once per batch. Its loss units
    (``units`` of them: counted tokens, or aligned groups for ``cross_tokenizer.CrossTokenizerHead``)
    are the entries of the ``TokenBatch`` that policies edit; ``labels`` are the student's
    counted labels, over which the cross-entropy's mean runs."""

    units: int
    labels: Tensor
    scaled_by_tau_sq: bool  # whether the module weighs each unit's loss by τ² (SPEC §1)

    def difficulty(self) -> Tensor:
        """Hellinger distance between p and q at τ = 1 per counted token, no gradient."""

    def kept_losses(self, tokens: TokenBatch, weights: Tensor, mean: GlobalMean) -> tuple[Tensor, Tensor]:
        """D of the kept tokens at their temperatures (to be weighted by ``weights``, τ_i²
        or 1) and the cross-entropy of every counted token, ready to backpropagate."""


class TokenHead:
    """A head whose loss units are the counted tokens, each a divergence scaled by τ²."""

    states: CountedStates
    scaled_by_tau_sq = True

    @property
    def labels(self) -> Tensor:
        return self.states.labels

    @property
    def units(self) -> int:
        return len(self.states.labels)


class EagerHead(TokenHead):
    """Both models' logits of the counted tokens, then the divergence with autograd.

    With token policies (``selective``) the student's logits are first computed without
    gradient, to judge difficulty, and its lm_head runs again on the kept tokens only:
    dropped tokens cost no backward work, unless the cross-entropy (``ce_weight > 0``)
    needs the gradient of every token anyway.
    """

    def __init__(
        self, divergence: losses.Divergence, ce_weight: float, states: CountedStates, selective: bool, lm_heads: LmHeads
    ):
        self.divergence, self.states, self.lm_heads = divergence, states, lm_heads
        grad_enabled = torch.is_grad_enabled()
        self.full_gradient = not selective or (ce_weight > 0 and grad_enabled)
        with torch.set_grad_enabled(grad_enabled and self.full_gradient):
            self.student_logits = lm_heads.logits("student", states.student)
        with torch.no_grad():
            self.teacher_logits = lm_heads.logits("teacher", states.teacher)
        with torch.set_grad_enabled(grad_enabled and ce_weight > 0):
            self.cross_entropy = cross_entropy_per_token(self.student_logits, states.labels)

    def difficulty(self) -> Tensor:
        return losses.hellinger(self.student_logits.detach(), self.teacher_logits)

    def kept_losses(self, tokens: TokenBatch, weights: Tensor, mean: GlobalMean) -> tuple[Tensor, Tensor]:
        keep = tokens.keep
        if self.full_gradient:
            student_logits = self.student_logits[keep]
        else:
            student_logits = self.lm_heads.logits("student", self.states.student[keep])
        return self.divergence(student_logits, self.teacher_logits[keep], tokens.temperature[keep]), self.cross_entropy


class FusedHead(TokenHead):
    """``losses.fused_divergence``: the student's lm_head and the divergence chunk by chunk
    against the teacher's ``targets``, the gradients ready after the forward pass, at the
    weights the loss gives each token.

    Without token policies one pass gives D and the cross-entropy of every token. With
    them (``selective``) a first chunked pass without gradient gives each token's
    difficulty and cross-entropy, and the gradient pass visits the kept tokens only;
    with ``ce_weight > 0`` it visits every counted token, the cross-entropy's gradient
    joining the divergence's in the same chunks.
    """

    def __init__(
        self,
        divergence: losses.Divergence,
        ce_weight: float,
        states: CountedStates,
        selective: bool,
        student_weight: Tensor,
        targets: losses.LinearTargets | losses.TopKTargets,
        *,
        chunk_size: int,
        compile: bool = False,
        matmul_dtype: torch.dtype | None = None,
    ):
        self.divergence, self.ce_weight, self.states = divergence, ce_weight, states
        self.student_weight, self.targets = student_weight, targets
        self.chunk_size, self.compile, self.matmul_dtype = chunk_size, compile, matmul_dtype
        self.statistics = None  # (difficulty, cross-entropy) per token, when policies judge them
        if selective:
            self.statistics = token_statistics(states.student.detach(), student_weight, targets, states.labels, chunk_size)

    def difficulty(self) -> Tensor:
        return self.statistics[0]

    def kept_losses(self, tokens: TokenBatch, weights: Tensor, mean: GlobalMean) -> tuple[Tensor, Tensor]:
        keep, states = tokens.keep, self.states
        if self.ce_weight:  # both gradients from one pass over every counted token, at the loss's weights
            loss_weights = torch.zeros_like(tokens.temperature)
            loss_weights[keep] = (1 - self.ce_weight) * mean.world_size / mean.kd_count * weights
            ce_weights = self.ce_weight * mean.world_size / mean.ce_count
            per_token, cross_entropy = self.fused(
                states.student, self.targets, tokens.temperature, loss_weights, labels=states.labels, ce_weights=ce_weights
            )
            return per_token[keep], cross_entropy
        if self.statistics is None:  # every token kept: the cross-entropy comes from the same pass
            return self.fused(states.student, self.targets, tokens.temperature[keep], weights, labels=states.labels)
        per_token = self.fused(states.student[keep], self.targets[keep], tokens.temperature[keep], weights)
        return per_token, self.statistics[1]

    def fused(self, student_hidden: Tensor, targets, temperature: Tensor, weights: Tensor, **kwargs):
        return losses.fused_divergence(
            self.divergence, student_hidden, self.student_weight, targets, temperature, self.chunk_size,
            weights=weights, compile=self.compile, matmul_dtype=self.matmul_dtype, **kwargs,
        )
