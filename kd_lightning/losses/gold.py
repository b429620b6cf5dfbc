"""TRL GOLD's cross-tokenizer objective, reproduced for comparison (SPEC §6).

What TRL's GOLD trainer computes (``trl.experimental.gold``, ``ULDLoss`` with
``use_extended_uld=True`` and ``uld_use_hybrid_loss=True``), per aligned group:

- **Groups** close where both tokenisations end a token at the same byte (as
  ``kd_lightning.alignment``); the end markers are skipped by default
  (``uld_skip_student_eos``/``uld_skip_teacher_eos``).
- **Merge.** A group of several tokens on a side becomes one vector: a base distribution
  times the probability of the group's other tokens, each factor clamped at 1e-8:
  ``q̂ = q_base · Π_k max(q_k(x_k), 1e-8)``, unnormalised. TRL's default ``"observed"``
  strategy takes the distribution at the position of the group's first token (in Hugging
  Face's indexing, one after the position predicting it) and the probabilities that each
  later position gives its own input token; ``"bayesian"`` takes the position predicting
  the group's last token and the chain-rule probabilities of its earlier tokens. Here the
  base distribution is whatever logits the caller gathers and ``LaterTokens`` carries
  ``log Π_k max(q_k(x_k), 1e-8)`` (``later_token_log_probs(..., floor=log 1e-8)``).
- **Matched/unmatched split by token string**: a teacher id and a student id match when
  their vocabulary strings are equal (``spelling_match``; ``Ġthe`` and ``▁the`` do not).
- **Matched term**: the generalised JSD of the merged vectors restricted to M, entry by
  entry, without renormalising, with each entry clamped at 1e-8:
  ``JSD_β = β Σ_M p̂ (log p̂ − log m) + (1 − β) Σ_M q̂ (log q̂ − log m)``, ``m = β p̂ + (1 − β) q̂``;
  at β = 0 it is ``Σ_M p̂ (log p̂ − log q̂)``, at β = 1 ``Σ_M q̂ (log q̂ − log p̂)`` (β = ``beta``, 0.5).
- **Unmatched term**: ``Σ_k |sort↓(p̂[U_t])_k − sort↓(q̂[U_s])_k|``, zero-padded; 0 unless
  both sides have unmatched ids.
- **Weights**: ``w_m · JSD + w_u · ULD`` with, by default, ``w_m = |M| / V_t`` (V_t: the
  teacher's logits) and ``w_u = 1 − w_m``; or both given (``uld_hybrid_*_weight``).
- **Temperature**: ``softmax(logits / T)`` with the loss's own student and teacher
  temperatures (``uld_student_temperature``, ``uld_teacher_temperature``, both 1 by
  default); GOLDConfig's ``temperature`` (0.9) is the sampling temperature and does not
  reach this loss. No τ² factor. Here one τ serves both sides.
- **Reduction**: TRL averages the group losses of each example, then the examples; this
  function returns the group losses.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kd_lightning.losses.base import compute_dtype, tempered_log_probs
from kd_lightning.losses.group_terms import LaterTokens, MatchedIds, check_group_inputs, sorted_l1

if TYPE_CHECKING:  # kd_lightning.losses imports pure torch only: the match's module loads transformers
    from kd_lightning.vocabulary import VocabularyMatch

#: GOLD clamps every probability it takes a log of, and every merged factor, at this value
GOLD_PROBABILITY_FLOOR = 1e-8


def gold(
    student_logits: Tensor,
    teacher_logits: Tensor,
    match: VocabularyMatch,
    temperature: float | Tensor = 1.0,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    later: LaterTokens | None = None,
) -> Tensor:
    """GOLD's loss per group, ``[G]``: ``w_m · JSD_β(p̂[M_t], q̂[M_s]) + w_u · ULD(p̂[U_t], q̂[U_s])``
    (see the module docstring), ``p̂ = softmax(t/τ) · exp(L_t)``, ``q̂ = softmax(z/τ) · exp(L_s)``
    with ``L`` from ``later`` (0 without it: every group one token).

    ``match`` is GOLD's spelling match (``spelling_match``) to reproduce TRL, or any
    ``VocabularyMatch``. ``matched_weight`` and ``unmatched_weight``: both None (GOLD's
    adaptive ``|M| / V_t`` and its complement) or both numbers. 0 ≤ beta ≤ 1.
    """
    check_group_inputs(student_logits, teacher_logits, match, temperature)
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError("matched_weight and unmatched_weight are both None (GOLD's adaptive weights) or both numbers")
    dtype = compute_dtype(student_logits, teacher_logits)
    student_probs = merged_probs(student_logits, temperature, dtype, None if later is None else later.student_log_probs)
    teacher_probs = merged_probs(teacher_logits, temperature, dtype, None if later is None else later.teacher_log_probs)
    student_ids = MatchedIds.of(match.student_ids, student_logits.shape[-1], student_logits.device)
    teacher_ids = MatchedIds.of(match.teacher_ids, teacher_logits.shape[-1], student_logits.device)
    if matched_weight is None:
        matched_weight = len(match) / teacher_logits.shape[-1]
        unmatched_weight = 1.0 - matched_weight
    loss = matched_weight * pointwise_jsd(student_probs[:, student_ids.matched], teacher_probs[:, teacher_ids.matched], beta)
    if student_ids.has_unmatched and teacher_ids.has_unmatched:
        unmatched = sorted_l1(teacher_probs[:, teacher_ids.unmatched], student_probs[:, student_ids.unmatched])
        loss = loss + unmatched_weight * unmatched
    return loss


def merged_probs(logits: Tensor, temperature: float | Tensor, dtype: torch.dtype, later_log_probs: Tensor | None) -> Tensor:
    """``softmax(logits/τ) · exp(L)``: GOLD's merged vector of each group (unnormalised)."""
    probs = tempered_log_probs(logits, temperature, dtype).exp()
    if later_log_probs is None:
        return probs
    return probs * later_log_probs.to(device=probs.device, dtype=dtype).exp().unsqueeze(-1)


def pointwise_jsd(student_probs: Tensor, teacher_probs: Tensor, beta: float) -> Tensor:
    """GOLD's generalised JSD summed entry by entry over the last dim, on vectors that need
    not sum to 1, each entry clamped at 1e-8 (see the module docstring for β = 0 and 1)."""
    student = student_probs.clamp_min(GOLD_PROBABILITY_FLOOR)
    teacher = teacher_probs.clamp_min(GOLD_PROBABILITY_FLOOR)
    student_log, teacher_log = student.log(), teacher.log()
    if beta == 0:
        return (teacher * (teacher_log - student_log)).sum(-1)
    if beta == 1:
        return (student * (student_log - teacher_log)).sum(-1)
    mixture_log = torch.logaddexp(student_log + math.log1p(-beta), teacher_log + math.log(beta))
    return (beta * teacher * (teacher_log - mixture_log) + (1 - beta) * student * (student_log - mixture_log)).sum(-1)


def spelling_match(teacher_tokenizer, student_tokenizer) -> VocabularyMatch:
    """GOLD's vocabulary match: a teacher id and a student id are paired when their strings
    in ``get_vocab()`` are equal (special tokens included, no end-marker pairing), sorted
    by teacher id. Raises ``ValueError`` when no string is shared."""
    teacher_vocabulary, student_vocabulary = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    pairs = sorted((teacher_id, student_vocabulary[piece]) for piece, teacher_id in teacher_vocabulary.items() if piece in student_vocabulary)
    if not pairs:
        raise ValueError(
            f"no token string of the teacher's {type(teacher_tokenizer).__name__} is in the vocabulary of the student's "
            f"{type(student_tokenizer).__name__}: GOLD's spelling match is empty"
        )
    from kd_lightning.vocabulary import VocabularyMatch

    teacher_ids, student_ids = torch.tensor(pairs, dtype=torch.long).T.contiguous()
    # a spelling match decodes nothing: no id is counted as without bytes
    return VocabularyMatch(teacher_ids, student_ids, len(teacher_vocabulary), len(student_vocabulary), 0, 0)
