"""Distillation objectives between two tokenizers, per aligned group (SPEC §6).

Inputs per group g (``kd_lightning.alignment``: the logits gathered at the position
predicting each group's first token, where both models have read the same text):
student logits ``z_g ∈ R^{V_s}``, teacher logits ``t_g ∈ R^{V_t}``, ``τ_g``; M the vocabulary
match (``kd_lightning.vocabulary``). ``q = softmax(z/τ)``, ``p = softmax(t/τ)``. Each
objective returns a loss per group, ``[G]``, float32 (float64 for float64 inputs),
differentiable with respect to the student's logits.

- ``hybrid``: ``D(p̃ ‖ q̃) + w_u · ULD(p[U_t], q[U_s])`` with ``p̃ = (p[M_t], 1 − Σ p[M_t])`` and
  ``q̃ = (q[M_s], 1 − Σ q[M_s])`` on |M| + 1 outcomes, D any divergence of the registry.
- ``uld``: ``Σ_k |sort↓(p)_k − sort↓(q)_k|``, zero-padded to max(V_s, V_t) (Boizard et al.).
- ``gold``: TRL GOLD's objective (``kd_lightning.losses.gold``).

**τ².** SPEC §1 has the caller multiply a same-tokenizer divergence by τ² (``scale_by_tau_sq``).
``hybrid`` returns its value *without* τ², and the caller scales it exactly like a
same-tokenizer divergence: the training loss is ``τ²·D + τ²·w_u·ULD``. Both terms' gradients
shrink alike as τ grows, so one factor keeps their ratio; SPEC §6's ``τ²·D + w_u·ULD`` is
the same loss with ``w_u`` read as ``w_u·τ²`` (identical at τ = 1). ``uld`` and ``gold``
reproduce peers that apply no τ² factor: ``Objective.scaled_by_tau_sq`` says which is which.

**Later positions of multi-token groups** (``later_positions``):

- ``"none"`` (the default): only each group's first position carries a distillation term;
  the later positions of a group get none (the cross-entropy on labels, if weighted in,
  still covers them).
- ``"group_probability"`` (``hybrid``): a term on the probability of the group's text, each
  side through its own tokens by the chain rule, ``P_s(g) = q_0(s_0) · Π_{k≥1} q_k(s_k)`` and
  ``P_t(g)`` alike, for every group with more than one token on a side:
  ``w_g · D((P_t, 1 − P_t) ‖ (P_s, 1 − P_s))``. Its gradient reaches the later positions.
- ``"merge"`` (``uld``; always in ``gold``): GOLD's merge, the first position's distribution
  times the probability of the group's later tokens, ``q · exp(L_s)`` and ``p · exp(L_t)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kd_lightning.losses.base import Divergence, compute_dtype, tempered_log_probs
from kd_lightning.losses.gold import gold
from kd_lightning.losses.group_terms import LaterTokens, MatchedIds, check_group_inputs, sorted_l1

if TYPE_CHECKING:  # kd_lightning.losses imports pure torch only: the match's module loads transformers
    from kd_lightning.vocabulary import VocabularyMatch

LATER_POSITIONS = {"hybrid": ("none", "group_probability"), "uld": ("none", "merge")}


def hybrid(
    divergence: Divergence,
    student_logits: Tensor,
    teacher_logits: Tensor,
    match: VocabularyMatch,
    temperature: float | Tensor = 1.0,
    unmatched_weight: float = 1.0,
    later_positions: str = "none",
    later: LaterTokens | None = None,
    group_probability_weight: float = 1.0,
) -> Tensor:
    """``D(p̃ ‖ q̃) + w_u · Σ_k |sort↓(p[U_t])_k − sort↓(q[U_s])_k|`` per group, ``[G]`` (no τ²:
    see the module docstring).

    ``p̃ = (p[M_t], p_rest)`` and ``q̃ = (q[M_s], q_rest)`` are distributions on |M| + 1
    outcomes, the last "any unmatched token" with ``log p_rest = logsumexp(log p[U_t])``.
    When neither side has an unmatched id the rest outcome is left out: with one tokenizer
    and the identity match, hybrid is the same-tokenizer ``D(p ‖ q)`` exactly. When only one
    side has unmatched ids the other's rest has probability 0 (log −inf), which D treats as
    any zero-probability outcome (FKL is then infinite if the teacher's rest has mass).

    ``w_u = unmatched_weight`` (default 1) weighs ULD between the unmatched entries of p
    and q (unnormalised: their masses are the rest outcomes' own), which shapes the
    student's distribution within its rest. CSD's ``us`` weighting is uniform over the
    |M| + 1 outcomes. ``later_positions``: ``"none"`` or ``"group_probability"`` (with
    ``later`` and weight ``group_probability_weight``), see the module docstring.
    """
    check_group_inputs(student_logits, teacher_logits, match, temperature)
    check_later(later_positions, LATER_POSITIONS["hybrid"], later, needs_first_ids=True)
    dtype = compute_dtype(student_logits, teacher_logits)
    student_log_probs = tempered_log_probs(student_logits, temperature, dtype)
    teacher_log_probs = tempered_log_probs(teacher_logits, temperature, dtype)
    student_ids = MatchedIds.of(match.student_ids, student_logits.shape[-1], student_logits.device)
    teacher_ids = MatchedIds.of(match.teacher_ids, teacher_logits.shape[-1], student_logits.device)
    with_rest = student_ids.has_unmatched or teacher_ids.has_unmatched
    loss = divergence.values(
        student_ids.outcomes(student_log_probs, with_rest), teacher_ids.outcomes(teacher_log_probs, with_rest)
    )
    if unmatched_weight and with_rest:
        unmatched = sorted_l1(
            teacher_log_probs[:, teacher_ids.unmatched].exp(), student_log_probs[:, student_ids.unmatched].exp()
        )
        loss = loss + unmatched_weight * unmatched
    if later_positions == "group_probability":
        loss = loss + group_probability_weight * group_probability_term(divergence, student_log_probs, teacher_log_probs, later)
    return loss


def group_probability_term(divergence: Divergence, student_log_probs: Tensor, teacher_log_probs: Tensor, later: LaterTokens) -> Tensor:
    """``D((P_t, 1 − P_t) ‖ (P_s, 1 − P_s))`` per group with more than one token on a side, 0
    for the others, where ``log P_s = log q_0(s_0) + L_s`` (likewise ``P_t``)."""
    student_first = student_log_probs.gather(-1, later.student_first_ids.unsqueeze(-1)).squeeze(-1)
    teacher_first = teacher_log_probs.gather(-1, later.teacher_first_ids.unsqueeze(-1)).squeeze(-1)
    student = two_outcomes(student_first + later.student_log_probs.to(student_first.dtype))
    teacher = two_outcomes(teacher_first + later.teacher_log_probs.to(teacher_first.dtype))
    several_tokens = (later.student_sizes > 1) | (later.teacher_sizes > 1)
    return torch.where(several_tokens.to(student.device), divergence.values(student, teacher), 0.0)


def two_outcomes(log_probability: Tensor) -> Tensor:
    """``(log P, log(1 − P))`` as ``[G, 2]``; log P is kept within [lowest, −eps] so that
    neither entry nor its gradient is infinite, and log(1 − P) is computed stably."""
    information = torch.finfo(log_probability.dtype)
    log_probability = log_probability.clamp(information.min, -information.eps)
    complement = torch.where(
        log_probability > -math.log(2),
        torch.log(-torch.expm1(log_probability)),
        torch.log1p(-torch.exp(log_probability)),
    )
    return torch.stack([log_probability, complement], -1)


def uld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 1.0,
    later_positions: str = "none",
    later: LaterTokens | None = None,
) -> Tensor:
    """Universal Logit Distillation per group, ``[G]``: ``Σ_k |sort↓(p)_k − sort↓(q)_k|`` with
    the shorter vocabulary zero-padded to max(V_s, V_t), p and q at τ (Boizard et al. 2024:
    the Wasserstein-1 distance between the sorted distributions; no vocabulary match).
    ``later_positions="merge"`` compares ``sort↓(p)·exp(L_t)`` with ``sort↓(q)·exp(L_s)`` (GOLD's merge)."""
    check_group_inputs(student_logits, teacher_logits, None, temperature)
    check_later(later_positions, LATER_POSITIONS["uld"], later, needs_first_ids=False)
    dtype = compute_dtype(student_logits, teacher_logits)
    student_probs = tempered_log_probs(student_logits, temperature, dtype).exp()
    teacher_probs = tempered_log_probs(teacher_logits, temperature, dtype).exp()
    if later_positions == "merge":
        student_probs = student_probs * later.student_log_probs.to(dtype).exp().unsqueeze(-1)
        teacher_probs = teacher_probs * later.teacher_log_probs.to(dtype).exp().unsqueeze(-1)
    return sorted_l1(teacher_probs, student_probs)


def check_later(later_positions: str, choices: tuple[str, ...], later: LaterTokens | None, needs_first_ids: bool) -> None:
    """Raise ``ValueError`` for an unknown ``later_positions`` or one that lacks ``later``."""
    if later_positions not in choices:
        raise ValueError(f"unknown later_positions {later_positions!r}; valid choices: {', '.join(choices)}")
    if later_positions == "none":
        return
    needed = ["student_log_probs", "teacher_log_probs"]
    if needs_first_ids:
        needed += ["student_first_ids", "teacher_first_ids", "student_sizes", "teacher_sizes"]
    missing = needed if later is None else [name for name in needed if getattr(later, name) is None]
    if missing:
        raise ValueError(f"later_positions={later_positions!r} needs LaterTokens with {', '.join(missing)}")


# ------------------------------------------------------------------------- the registry


def _hybrid(divergence, student_logits, teacher_logits, match, temperature, later, **params) -> Tensor:
    return hybrid(divergence, student_logits, teacher_logits, match, temperature, later=later, **params)


def _uld(divergence, student_logits, teacher_logits, match, temperature, later, **params) -> Tensor:
    return uld(student_logits, teacher_logits, temperature, later=later, **params)


def _gold(divergence, student_logits, teacher_logits, match, temperature, later, **params) -> Tensor:
    return gold(student_logits, teacher_logits, match, temperature, later=later, **params)


#: name → (the call, the function whose keyword parameters it takes, whether the caller scales by τ²)
_OBJECTIVES: dict[str, tuple[Callable, Callable, bool]] = {
    "hybrid": (_hybrid, hybrid, True),
    "uld": (_uld, uld, False),
    "gold": (_gold, gold, False),
}
_INPUTS = {"divergence", "student_logits", "teacher_logits", "match", "temperature", "later"}


@dataclass(frozen=True)
class Objective:
    """A cross-tokenizer objective with its parameters: ``objective(z, t, match, τ, later)`` → ``[G]``.

    ``scaled_by_tau_sq``: whether the caller multiplies the result by τ² (SPEC §1) — True
    for ``hybrid``, whose D is a divergence between tempered distributions; False for the
    peers' ``uld`` and ``gold``, which apply none. ``divergence`` serves ``hybrid`` only.
    """

    name: str
    divergence: Divergence | None
    params: dict = field(default_factory=dict)

    @property
    def scaled_by_tau_sq(self) -> bool:
        return _OBJECTIVES[self.name][2]

    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        match: VocabularyMatch,
        temperature: float | Tensor = 1.0,
        later: LaterTokens | None = None,
    ) -> Tensor:
        call = _OBJECTIVES[self.name][0]
        return call(self.divergence, student_logits, teacher_logits, match, temperature, later, **self.params)


def available() -> list[str]:
    """The objective names ``objective`` accepts, sorted."""
    return sorted(_OBJECTIVES)


def objective(name: str, divergence: Divergence | None = None, **params) -> Objective:
    """The objective ``name`` (``uld``, ``gold`` or ``hybrid``) with its keyword ``params``
    (e.g. ``unmatched_weight``, ``later_positions``; gold's ``beta``). ``hybrid`` needs
    ``divergence`` (any of ``losses.get``); ``uld`` and ``gold`` do not use it.

    Raises ``ValueError`` for an unknown name or parameter (listing the valid ones) and for
    ``hybrid`` without a divergence.
    """
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown cross-tokenizer objective {name!r}; valid objectives: {', '.join(available())}")
    accepted = [key for key in inspect.signature(_OBJECTIVES[name][1]).parameters if key not in _INPUTS]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"objective {name!r} takes no parameter {', '.join(unknown)}; its parameters: {', '.join(accepted)}")
    if name == "hybrid" and not isinstance(divergence, Divergence):
        raise ValueError(f"objective 'hybrid' needs a divergence (from kd_lightning.losses.get), got {divergence!r}")
    later_positions = params.get("later_positions", "none")
    if name in LATER_POSITIONS and later_positions not in LATER_POSITIONS[name]:
        raise ValueError(f"unknown later_positions {later_positions!r}; valid choices: {', '.join(LATER_POSITIONS[name])}")
    return Objective(name, divergence, dict(params))
