"""What the cross-tokenizer objectives share: checked inputs, one side's view of the
vocabulary match, the sorted-distribution distance and the groups' later tokens (SPEC §6).

Notation per group g: student logits ``z_g ∈ R^{V_s}`` and teacher logits ``t_g ∈ R^{V_t}``
at the position predicting the group's first token, temperature ``τ_g``;
``q = softmax(z/τ)``, ``p = softmax(t/τ)``. M is the vocabulary match: ``match.teacher_ids[k]``
and ``match.student_ids[k]`` stand for the same bytes. ``U_s`` and ``U_t`` are the ids of
each side's logits that M leaves unmatched (special tokens, padded lm_head rows, pieces the
other side lacks).

**Later positions.** A group of several tokens on a side has positions after its first
(predicting its second token onwards). The objectives compare the distributions at the
first position only, unless ``LaterTokens`` says what the later positions predicted:
``L = Σ_{k ≥ 1} log q_k(x_k)``, the tempered log-probability of the group's later tokens
``x_k``, each at the position that predicts it (0 for a one-token group).
``later_token_log_probs`` computes it a chunk of positions at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kd_lightning.losses.base import check_temperature, compute_dtype, tempered_log_probs

if TYPE_CHECKING:  # kd_lightning.losses imports pure torch only: the match's module loads transformers
    from kd_lightning.vocabulary import VocabularyMatch


@dataclass(frozen=True)
class LaterTokens:
    """What each group's later positions predicted, per group ``[G]`` (see the module docstring).

    student_log_probs: ``L_s = Σ_{k ≥ 1} log q_k(s_k)`` at the group's τ (0 for |S_g| = 1);
        differentiable: its gradient reaches the student's later positions.
    teacher_log_probs: ``L_t``, the same for the teacher.
    student_first_ids, teacher_first_ids: int64, the group's first token on each side (the
        group-probability term needs them, ``P_s(g) = q_0(s_0) · exp(L_s)``).
    student_sizes, teacher_sizes: int64, |S_g| and |T_g| (that term covers only groups with
        more than one token on a side).
    """

    student_log_probs: Tensor
    teacher_log_probs: Tensor
    student_first_ids: Tensor | None = None
    teacher_first_ids: Tensor | None = None
    student_sizes: Tensor | None = None
    teacher_sizes: Tensor | None = None


def later_token_log_probs(
    logits: Tensor,
    token_ids: Tensor,
    groups: Tensor,
    group_count: int,
    temperature: float | Tensor = 1.0,
    floor: float | None = None,
) -> Tensor:
    """``L_g = Σ_{k: groups_k = g} max(log softmax(logits_k / τ_k)[token_ids_k], floor)``, ``[group_count]``.

    logits: ``[n, V]`` at the positions predicting some groups' later tokens ``token_ids``
    (``[n]``); groups: ``[n]``, the group of each; temperature: a float or ``[n]`` (each
    position at its group's τ). The sum is additive over positions, so a caller may call
    this a chunk of positions at a time and add the results. ``floor`` bounds each factor
    from below (GOLD clamps each probability at 1e-8: ``floor = log 1e-8``).
    """
    check_temperature(temperature)
    dtype = compute_dtype(logits)
    picked = tempered_log_probs(logits, temperature, dtype).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    if floor is not None:
        picked = picked.clamp_min(floor)
    return torch.zeros(group_count, dtype=dtype, device=logits.device).index_add(0, groups, picked)


@dataclass(frozen=True)
class MatchedIds:
    """One side of M on that side's logits: the matched ids in pair order, the unmatched ids
    and a mask that is True on the matched ones."""

    matched: Tensor  # int64 [|M|]
    unmatched: Tensor  # int64 [V − |M|]
    mask: Tensor  # bool [V]

    @staticmethod
    def of(ids: Tensor, vocabulary_size: int, device: torch.device) -> MatchedIds:
        ids = ids.to(device)
        mask = torch.zeros(vocabulary_size, dtype=torch.bool, device=device)
        mask[ids] = True
        return MatchedIds(matched=ids, unmatched=(~mask).nonzero().squeeze(-1), mask=mask)

    @property
    def has_unmatched(self) -> bool:
        return len(self.unmatched) > 0

    def outcomes(self, log_probs: Tensor, with_rest: bool) -> Tensor:
        """The log-probabilities of the |M| matched outcomes and, with ``with_rest``, of
        "any unmatched token" last: ``log Σ_{x ∈ U} e^{log_probs_x}`` by logsumexp over the
        unmatched entries (never ``log(1 − Σ matched)``, which cancels catastrophically),
        −inf when this side has no unmatched id."""
        matched = log_probs[..., self.matched]
        if not with_rest:
            return matched
        if self.has_unmatched:
            rest = log_probs.masked_fill(self.mask, -torch.inf).logsumexp(-1, keepdim=True)
        else:  # a constant: logsumexp over nothing would give a NaN gradient
            rest = torch.full_like(matched[..., :1], -torch.inf)
        return torch.cat([matched, rest], -1)


def sorted_l1(first: Tensor, second: Tensor) -> Tensor:
    """``Σ_k |sort↓(first)_k − sort↓(second)_k|`` over the last dim, the shorter zero-padded
    (ULD: the Wasserstein-1 distance between two distributions sorted by probability, with
    unit ground cost between different ranks). 0 when both are empty."""
    width = max(first.shape[-1], second.shape[-1])
    if width == 0:
        return first.new_zeros(first.shape[:-1])
    first = torch.nn.functional.pad(first.sort(-1, descending=True).values, (0, width - first.shape[-1]))
    second = torch.nn.functional.pad(second.sort(-1, descending=True).values, (0, width - second.shape[-1]))
    return (first - second).abs().sum(-1)


def check_group_inputs(
    student_logits: Tensor, teacher_logits: Tensor, match: VocabularyMatch | None, temperature: float | Tensor
) -> None:
    """Raise ``ValueError`` unless the logits are ``[G, V_s]`` and ``[G, V_t]`` for the same
    G, M is non-empty with every id inside its side's logits, and τ > 0 (a float or ``[G]``)."""
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(
            f"group logits must be [groups, vocabulary]: got student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)}"
        )
    if len(student_logits) != len(teacher_logits):
        raise ValueError(
            f"student and teacher logits must cover the same groups: the student's have {len(student_logits)} "
            f"rows, the teacher's {len(teacher_logits)}"
        )
    check_temperature(temperature)
    if isinstance(temperature, Tensor) and temperature.dim() > 0 and temperature.shape != (len(student_logits),):
        raise ValueError(f"a tensor temperature holds one τ per group: shape {tuple(temperature.shape)}, not ({len(student_logits)},)")
    if match is not None:
        check_match(match, student_logits.shape[-1], teacher_logits.shape[-1])


def check_match(match: VocabularyMatch, student_vocabulary: int, teacher_vocabulary: int) -> None:
    """Raise ``ValueError`` for an empty M or an id outside its side's logits (naming both sizes)."""
    if len(match) == 0:
        raise ValueError("the vocabulary match is empty: no teacher id is paired with a student id")
    for side, ids, size in (("student", match.student_ids, student_vocabulary), ("teacher", match.teacher_ids, teacher_vocabulary)):
        outside = ids[(ids < 0) | (ids >= size)]
        if len(outside):
            raise ValueError(
                f"the vocabulary match pairs {side} id {int(outside[0])} but the {side} logits have {size} entries "
                f"(student {student_vocabulary}, teacher {teacher_vocabulary}): match the tokenizers of these models"
            )
