"""The loss head for a teacher and a student with different tokenizers (SPEC §6).

A batch from ``data.cross_tokenizer.CrossTokenizerDataModule`` holds each side's own
tokens and the aligned groups. The student runs on its ids, the teacher (under
``torch.no_grad``) on its own, or its states come from a teacher cache of its own tokens
(``kd-cache`` with the same ``cross_tokenizer``; an exact cache only); each side's final
hidden states are gathered at the position predicting each group's first token, where
both models have read the same text. Per group g, with ``z_g = lm_head_s(h_s)`` cut to the student tokenizer's ``V_s``
rows and ``t_g = lm_head_t(h_t)`` cut to ``V_t``:

    ℓ_g = w_g · objective(z_g, t_g, M, τ_g)        (losses.cross_tokenizer: hybrid, uld, gold)

with ``w_g = τ_g²`` when the objective is scaled like a divergence (``hybrid``) and
``scale_by_tau_sq``, else 1 (``uld`` and ``gold`` reproduce peers that apply none). The
KD loss is the mean of ℓ over the kept groups of the global batch; the cross-entropy of
``ce_weight`` is the student's own, on its labels, averaged over its counted tokens.

**Groups are the policies' tokens.** A ``TokenBatch`` holds one entry per group: LATF
keeps the hardest groups, IDTS sets τ per group. A group's difficulty is the Hellinger
distance at τ = 1 between the matched outcomes ``p̃ = (p[M_t], p_rest)`` and
``q̃ = (q[M_s], q_rest)``, the distributions ``hybrid`` compares (the rest outcome "any
unmatched token" only where a side has unmatched ids). With one tokenizer and the
identity match it is the same-tokenizer difficulty.

**Cost.** Groups are visited ``chunk_size`` at a time, so neither side ever holds more
than ``chunk_size × V`` logits. With ``loss_impl="fused"`` (the default) and a bias-free
linear student lm_head, each chunk's gradients come from the forward pass itself, at the
weights the loss will give each group (``ForeseenGroupLosses``, as ``losses.fused_divergence``
does for one tokenizer): the teacher's logits and the objective are computed once per step.
Otherwise (``"eager"``) each chunk runs inside ``torch.utils.checkpoint`` and the backward
pass computes both sides' logits and the objective again, a chunk at a time.

**Later positions of multi-token groups.** With ``later_positions="none"`` (``hybrid``'s
and ``uld``'s default) they carry no term. ``gold`` (always), ``uld`` with ``"merge"`` and
``hybrid`` with ``"group_probability"`` also use ``L = Σ_{k≥1} log q_k(x_k)`` per group and
side: the log-probability, at the group's τ, that each position predicting one of the
group's later tokens gives that token (``LaterPositions``; GOLD's merge clamps each factor
at 1e-8). The student's ``L`` carries gradient to those positions; both are computed a
chunk of positions at a time, checkpointed like the groups, for the kept groups only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerBase

from kd_lightning import losses
from kd_lightning.data.cross_tokenizer import GROUP_KEYS, counted_rows_at, teacher_side
from kd_lightning.data.datamodule import counted_positions
from kd_lightning.heads import GlobalMean, LmHeads
from kd_lightning.losses.base import compute_dtype
from kd_lightning.losses.fused import accumulate_gradients, cross_entropy_per_token, upstream_scale
from kd_lightning.losses.group_terms import LaterTokens, MatchedIds, later_token_log_probs
from kd_lightning.models import last_hidden_state, lm_head
from kd_lightning.tokens import TokenBatch
from kd_lightning.vocabulary import VocabularyMatch, match_vocabularies

def check_cross_tokenizer_cache(cache_format: str, objective: str) -> None:
    """Refuses a top-k teacher cache for a cross-tokenizer objective: ``hybrid`` and ``gold``
    need the teacher's probability of every matched id, ``uld`` its whole sorted
    distribution, and a top-k cache holds K of them."""
    if cache_format != "exact":
        raise ValueError(
            f"cross_tokenizer={objective} cannot train from a {cache_format} teacher cache: it needs the teacher's "
            "probability of every matched id (hybrid, gold) or its whole sorted distribution (uld), not the top K; "
            "build an exact cache (cache.format=exact) with kd-cache and the same overrides"
        )


def identity_match(vocabulary_size: int) -> VocabularyMatch:
    """M = every id paired with itself: one tokenizer on both sides, every logit row matched,
    so the rest outcome is empty and ``hybrid`` is the same-tokenizer divergence exactly."""
    ids = torch.arange(vocabulary_size)
    return VocabularyMatch(ids, ids.clone(), vocabulary_size, vocabulary_size, 0, 0)


def tokenizer_match(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> VocabularyMatch:
    """The identity over the vocabulary for equal tokenizers, else ``match_vocabularies``
    with each side's EOS as its end-of-response marker (the data module ends responses with it)."""
    if teacher.get_vocab() == student.get_vocab():
        return identity_match(len(student))
    return match_vocabularies(teacher, student, teacher.eos_token_id, student.eos_token_id)


class CrossTokenizer:
    """A cross-tokenizer run's settings: the objective's ``name`` (``uld``, ``gold``,
    ``hybrid``) and keyword ``params``, and the vocabulary match M of the two tokenizers.
    (A plain class, not a dataclass: Hydra's ``instantiate`` would turn a dataclass argument
    into a config.)"""

    def __init__(self, name: str, match: VocabularyMatch, params: dict | None = None):
        self.name, self.match, self.params = name, match, dict(params or {})
        losses.cross_tokenizer.objective(self.name, losses.get("fkl"), **self.params)  # an unknown name or parameter fails here
        later_positions = self.params.get("later_positions", "none")
        self.uses_later_tokens = name == "gold" or later_positions != "none"
        merges = name == "gold" or later_positions == "merge"  # GOLD's merge clamps each factor at 1e-8
        self.later_floor = math.log(losses.gold.GOLD_PROBABILITY_FLOOR) if merges else None

    def head(self, student: nn.Module, teacher: nn.Module, batch: dict, divergence: losses.Divergence,
             ce_weight: float, chunk_size: int, loss_impl: str = "fused") -> CrossTokenizerHead:
        """The loss head of ``batch`` with this objective at the run's ``divergence``; with
        ``loss_impl="fused"`` its gradients come from the forward pass where the student's
        lm_head allows it (see the module docstring)."""
        objective = losses.cross_tokenizer.objective(self.name, divergence, **self.params)
        states = GroupStates.of(student, teacher, batch, self.uses_later_tokens)
        fused = LmHeads(lm_head(student), None, self.match.student_vocabulary).fused_weights() if loss_impl == "fused" else None
        return CrossTokenizerHead(objective, self.match, states, ce_weight, lm_head(student), lm_head(teacher),
                                  chunk_size, self.later_floor, None if fused is None else fused["student"])


@dataclass
class LaterPositions:
    """One side's positions that predict the later tokens of multi-token groups: their final
    hidden states, the tokens they predict and their groups; with each group's first token
    and size on that side (what ``losses.cross_tokenizer.LaterTokens`` needs besides ``L``)."""

    hidden: Tensor  # [n, H]
    ids: Tensor  # [n]
    groups: Tensor  # [n], into the batch's groups
    first_ids: Tensor  # [G]
    sizes: Tensor  # [G]

    @classmethod
    def of(
        cls, first_positions: Tensor, sizes: Tensor, input_ids: Tensor, states_at: Callable[[Tensor], Tensor]
    ) -> LaterPositions:
        """One side's later positions, from its groups' first predicting positions (flat
        indices into ``input_ids.flatten()``) and sizes; ``states_at`` gathers that side's
        final hidden states at flat positions. A group's tokens are consecutive: position
        ``first + k`` predicts its token ``k`` for ``k < size``."""
        later = sizes - 1
        groups = torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), later)
        steps = torch.arange(len(groups), device=sizes.device) - (later.cumsum(0) - later)[groups] + 1  # 1 … size − 1
        positions = first_positions[groups] + steps
        tokens = input_ids.flatten()
        return cls(states_at(positions), tokens[positions + 1], groups, tokens[first_positions + 1], sizes)


@dataclass
class GroupStates:
    """Both models' final hidden states at the groups' first predicting positions (and at
    their later positions, where the objective uses them), and the student's at its counted
    tokens (for the cross-entropy)."""

    student: Tensor  # [G, Hs], with gradient
    teacher: Tensor  # [G, Ht], without gradient
    counted_student: Tensor  # [N, Hs], with gradient
    labels: Tensor  # [N] the student's counted labels
    student_later: LaterPositions | None = None
    teacher_later: LaterPositions | None = None

    @classmethod
    def of(cls, student: nn.Module, teacher: nn.Module, batch: dict, with_later: bool = False) -> GroupStates:
        missing = [key for key in ("teacher_input_ids", "teacher_labels", *GROUP_KEYS) if key not in batch]
        if missing:
            raise KeyError(f"a cross-tokenizer batch (CrossTokenizerDataModule) holds {', '.join(missing)}; this one does not")
        student_hidden = last_hidden_state(student, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        student_at, teacher_at = student_hidden.flatten(0, 1).__getitem__, teacher_states(teacher, batch)
        counted = counted_positions(batch["labels"])
        states = cls(
            student=student_at(batch["group_student_positions"]),
            teacher=teacher_at(batch["group_teacher_positions"]),
            counted_student=student_hidden[:, :-1][counted],
            labels=batch["labels"][:, 1:][counted],
        )
        if with_later:
            states.student_later = LaterPositions.of(
                batch["group_student_positions"], batch["group_student_sizes"], batch["input_ids"], student_at)
            states.teacher_later = LaterPositions.of(
                batch["group_teacher_positions"], batch["group_teacher_sizes"], batch["teacher_input_ids"], teacher_at)
        return states


@torch.no_grad()
def teacher_states(teacher: nn.Module, batch: dict) -> Callable[[Tensor], Tensor]:
    """What gathers the teacher's final hidden states at flat positions of its own tokens
    (counted positions), from one forward of the live teacher or from a teacher cache of its
    own tokens (``kd-cache`` with the same ``cross_tokenizer``), which stores every counted position."""
    side = teacher_side(batch)
    if hasattr(teacher, "counted_outputs"):
        stored = teacher.counted_outputs(side)
        return lambda positions: stored[counted_rows_at(side["labels"], positions).to(stored.device)]
    return last_hidden_state(teacher, {key: side[key] for key in ("input_ids", "attention_mask")}).flatten(0, 1).__getitem__


def chunks(count: int, chunk_size: int) -> Iterator[slice]:
    return (slice(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size))


def checkpointed(function: Callable[..., Tensor], *inputs) -> Tensor:
    """``function(*inputs)``, its intermediates (a chunk's logits) recomputed in the backward
    pass instead of kept; called directly when no gradient is wanted."""
    if not torch.is_grad_enabled():
        return function(*inputs)
    return checkpoint(function, *inputs, use_reentrant=False)


class CrossTokenizerHead:
    """The loss head over aligned groups (see the module docstring): one loss unit per group."""

    def __init__(self, objective: losses.cross_tokenizer.Objective, match: VocabularyMatch, states: GroupStates,
                 ce_weight: float, student_head: nn.Module, teacher_head: nn.Module, chunk_size: int,
                 later_floor: float | None = None, student_weight: Tensor | None = None):
        self.objective, self.match, self.states, self.later_floor = objective, match, states, later_floor
        self.ce_weight, self.chunk_size = ce_weight, chunk_size
        self.student_head, self.teacher_head = student_head, teacher_head
        self.student_weight = student_weight  # [V_s, Hs], the lm_head's: gradients in the forward pass
        self.scaled_by_tau_sq = objective.scaled_by_tau_sq
        self.labels, self.units = states.labels, len(states.student)

    def student_logits(self, hidden: Tensor) -> Tensor:
        """``[n, V_s]``: the student's logits cut to its tokenizer's ids (rows beyond are padding)."""
        return self.student_head(hidden)[:, : self.match.student_vocabulary]

    def teacher_logits(self, hidden: Tensor) -> Tensor:
        return self.teacher_head(hidden)[:, : self.match.teacher_vocabulary]

    def difficulty(self) -> Tensor:
        """Hellinger distance at τ = 1 between the matched outcomes p̃ and q̃ per group, no gradient."""
        values = []
        with torch.no_grad():
            for rows in chunks(self.units, self.chunk_size):
                student_logits = self.student_logits(self.states.student[rows])
                teacher_logits = self.teacher_logits(self.states.teacher[rows])
                student_ids = MatchedIds.of(self.match.student_ids, student_logits.shape[-1], student_logits.device)
                teacher_ids = MatchedIds.of(self.match.teacher_ids, teacher_logits.shape[-1], student_logits.device)
                with_rest = student_ids.has_unmatched or teacher_ids.has_unmatched
                values.append(losses.hellinger(
                    student_ids.outcomes(student_logits.log_softmax(-1), with_rest),
                    teacher_ids.outcomes(teacher_logits.log_softmax(-1), with_rest),
                ))
        return torch.cat(values) if values else self.states.student.new_zeros(0, dtype=torch.float32)

    def group_losses(self, student_hidden: Tensor, teacher_hidden: Tensor, temperature: Tensor, *later: Tensor) -> Tensor:
        """The objective of one chunk of groups, from their hidden states (and the six
        ``LaterTokens`` fields of the chunk's groups where the objective uses them)."""
        with torch.no_grad():
            teacher_logits = self.teacher_logits(teacher_hidden)
        later_tokens = LaterTokens(*later) if later else None
        return self.objective(self.student_logits(student_hidden), teacher_logits, self.match, temperature, later_tokens)

    def later_log_probs(self, side: LaterPositions, logits: Callable[[Tensor], Tensor], tokens: TokenBatch) -> Tensor:
        """``L_g = Σ_{k≥1} log q_k(x_k)`` per group ``[G]`` at the group's τ, over the kept
        groups' later positions (0 for the others), a checkpointed chunk of positions at a time."""
        kept = tokens.keep[side.groups]
        hidden, ids, groups = side.hidden[kept], side.ids[kept], side.groups[kept]
        temperature = tokens.temperature.to(hidden.dtype)[groups]
        count = len(tokens.keep)

        def chunk_sum(rows_hidden: Tensor, rows_ids: Tensor, rows_groups: Tensor, rows_temperature: Tensor) -> Tensor:
            return later_token_log_probs(logits(rows_hidden), rows_ids, rows_groups, count, rows_temperature, self.later_floor)

        parts = [checkpointed(chunk_sum, hidden[rows], ids[rows], groups[rows], temperature[rows])
                 for rows in chunks(len(hidden), self.chunk_size)]
        return torch.stack(parts).sum(0) if parts else hidden.new_zeros(count, dtype=torch.float32)

    def later_tokens(self, tokens: TokenBatch) -> list[Tensor]:
        """The ``LaterTokens`` fields of the kept groups, in its order; empty where the
        objective uses only the groups' first positions."""
        student, teacher = self.states.student_later, self.states.teacher_later
        if student is None:
            return []
        with torch.no_grad():
            teacher_log_probs = self.later_log_probs(teacher, self.teacher_logits, tokens)
        student_log_probs = self.later_log_probs(student, self.student_logits, tokens)
        fields = (student_log_probs, teacher_log_probs, student.first_ids, teacher.first_ids, student.sizes, teacher.sizes)
        return [field[tokens.keep] for field in fields]

    def kept_losses(self, tokens: TokenBatch, weights: Tensor, mean: GlobalMean) -> tuple[Tensor, Tensor]:
        """The objective of the kept groups at their τ (to be weighted by ``weights``) and the
        student's cross-entropy on every counted token, chunk by chunk, ready to backpropagate."""
        student, teacher = self.states.student[tokens.keep], self.states.teacher[tokens.keep]
        temperature = tokens.temperature[tokens.keep].to(student.dtype)
        later = self.later_tokens(tokens)
        if self.student_weight is not None and torch.is_grad_enabled():
            inputs = (student, self.student_weight, temperature, teacher, *later)
            return ForeseenGroupLosses.apply(self, weights.detach(), *inputs), self.cross_entropy()
        per_group = [
            checkpointed(self.group_losses, student[rows], teacher[rows], temperature[rows], *(field[rows] for field in later))
            for rows in chunks(len(student), self.chunk_size)
        ]
        empty = student.new_zeros(0, dtype=torch.float32)
        return torch.cat(per_group) if per_group else empty, self.cross_entropy()

    def gradient_pass(self, weights: Tensor, student: Tensor, student_weight: Tensor, temperature: Tensor,
                      teacher: Tensor, *later: Tensor) -> tuple[Tensor, list[Tensor | None]]:
        """ℓ of the kept groups and the gradients of ``Σ_g weights_g · ℓ_g`` with respect to
        their hidden states, the lm_head weight and (where the objective uses later positions)
        ``L_s``: a chunk's teacher logits once, its student logits ``h Wᵀ`` as the leaf of the
        objective's autograd, their gradient through the lm_head into accumulators of the
        weight's compute dtype (float32 for bf16)."""
        dtype = compute_dtype(student_weight)
        hidden_grad = torch.zeros_like(student, dtype=dtype)
        weight_grad = torch.zeros_like(student_weight, dtype=dtype)
        later_grad = torch.zeros_like(later[0]) if later else None
        values = []
        for rows in chunks(len(student), self.chunk_size):
            with torch.no_grad():
                teacher_logits = self.teacher_logits(teacher[rows])
                leaves = [student[rows] @ student_weight.T, *(field[rows] for field in later[:1])]
            with torch.enable_grad():
                leaves = [leaf.requires_grad_() for leaf in leaves]
                later_tokens = LaterTokens(leaves[1], *(field[rows] for field in later[1:])) if later else None
                chunk_values = self.objective(leaves[0], teacher_logits, self.match, temperature[rows], later_tokens)
                gradients = torch.autograd.grad((chunk_values * weights[rows].to(chunk_values.dtype)).sum(), leaves)
            accumulate_gradients(gradients[0], rows, student[rows], student_weight, hidden_grad, weight_grad)
            if later:
                later_grad[rows] = gradients[1]
            values.append(chunk_values.detach())
        empty = student.new_zeros(0, dtype=torch.float32)
        return torch.cat(values) if values else empty, [hidden_grad, weight_grad, later_grad]

    def cross_entropy(self) -> Tensor:
        """``logsumexp(z) − z[label]`` per counted student token, with gradient only when weighted in."""
        hidden, labels = self.states.counted_student, self.states.labels
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.ce_weight > 0):
            values = [
                checkpointed(lambda rows_hidden, rows_labels: cross_entropy_per_token(
                    self.student_logits(rows_hidden), rows_labels), hidden[rows], labels[rows])
                for rows in chunks(len(hidden), self.chunk_size)
            ]
        return torch.cat(values) if values else hidden.new_zeros(0, dtype=torch.float32)


class ForeseenGroupLosses(torch.autograd.Function):
    """``CrossTokenizerHead.gradient_pass`` as an autograd function of the kept groups'
    hidden states, the student's lm_head weight and ``L_s``: its gradients, computed in the
    forward pass at ``weights``, are scaled in backward when the upstream gradient is
    proportional to them (what the module's weighted mean gives), else computed again at the upstream."""

    @staticmethod
    def forward(ctx, head: CrossTokenizerHead, weights: Tensor, student: Tensor, student_weight: Tensor, *rest: Tensor) -> Tensor:
        values, ctx.gradients = head.gradient_pass(weights, student, student_weight, *rest)
        ctx.head, ctx.weights, ctx.inputs = head, weights, (student, student_weight, *rest)
        return values

    @staticmethod
    def backward(ctx, upstream: Tensor):
        scale = upstream_scale(ctx.weights.to(upstream.dtype), upstream)
        if scale is None:  # an upstream gradient the forward pass could not foresee: compute it again
            _, gradients = ctx.head.gradient_pass(upstream, *ctx.inputs)
        else:
            gradients = [None if gradient is None else gradient * scale.to(gradient.dtype) for gradient in ctx.gradients]
        ctx.gradients = None
        student, student_weight, _, _, *later = ctx.inputs
        hidden_grad, weight_grad, later_grad = gradients
        later_grads = [later_grad, *[None] * (len(later) - 1)] if later else []
        return None, None, hidden_grad.to(student.dtype), weight_grad.to(student_weight.dtype), None, None, *later_grads
