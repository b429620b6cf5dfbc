"""What the student is compared with, chunk by chunk: the teacher's side of the fused path.

Two kinds of teacher output serve the fused, chunked loss (``fused.fused_divergence``):

- ``LinearTargets``: the teacher's final hidden states and lm_head weight; the chunk's
  logits are ``t = h Wᵀ`` over the whole vocabulary (a live teacher, or the exact cache).
- ``TopKTargets``: the teacher's K largest log-probabilities at τ = 1, their ids and the
  log of the tail mass ``log(1 − Σ_K p)`` (the top-k cache). The divergence is computed on
  K + 1 outcomes: the K ids and one "rest" outcome for every other token.

Each offers the chunk's teacher log-probabilities (or logits) at its temperatures, the
student's distribution on the same outcomes, and the way back from a gradient over those
outcomes to a gradient over the student's vocabulary. With ``TopKTargets`` and K = V
there is no rest outcome, and the loss is the full-vocabulary loss exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LinearTargets:
    """The teacher's logits ``t = h Wᵀ``, computed for a chunk of tokens at a time.

    hidden: ``[N, Ht]`` final hidden states; weight: ``[V, Ht]`` lm_head weight.
    """

    hidden: Tensor
    weight: Tensor

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, rows: Tensor) -> LinearTargets:
        return LinearTargets(self.hidden[rows], self.weight)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def for_matmuls(self, dtype: torch.dtype) -> LinearTargets:
        """These targets with their matmul operands in ``dtype``."""
        return LinearTargets(self.hidden.to(dtype), self.weight.to(dtype))

    def detach(self) -> LinearTargets:
        return LinearTargets(self.hidden.detach(), self.weight.detach())

    def tempered_logits(self, rows: Tensor, inverse_temperature: Tensor | None) -> Tensor:
        """``t/τ = (h/τ) Wᵀ`` of ``rows`` (``[n, V]``): τ costs no pass over the vocabulary."""
        hidden = self.hidden[rows]
        if inverse_temperature is not None:
            hidden = hidden * inverse_temperature[rows].unsqueeze(-1).to(hidden.dtype)
        return hidden @ self.weight.T

    def student_outcomes(self, student_logits: Tensor, rows: Tensor) -> Tensor:
        """The student's side on the same outcomes: its logits themselves."""
        return student_logits

    def vocabulary_gradient(self, outcome_gradient: Tensor, student_logits: Tensor, rows: Tensor) -> Tensor:
        """The gradient over the vocabulary: the outcomes are the vocabulary."""
        return outcome_gradient


@dataclass
class TopKTargets:
    """The teacher's top-K log-probabilities at τ = 1 and the log of its tail mass.

    log_probs: ``[N, K]`` log p of the K most likely ids; ids: ``[N, K]`` int64;
    tail_log_mass: ``[N]`` ``log Σ_{x ∉ top-K} p_x`` (−inf when K = V); vocab_size: V.

    **Re-tempering at τ ≠ 1.** ``p^τ_x ∝ p_x^{1/τ}`` on the top-K ids is exact. The tail's
    share is not stored token by token; it is re-tempered as if the tail mass m were spread
    evenly over its V − K ids: ``(V − K) · (m / (V − K))^{1/τ}``. For τ > 1 that is an upper
    bound of the true tail share (a flatter tail flattens more), for τ < 1 a lower bound;
    at τ = 1 it is exact. Then ``p̃ = (p^τ_1, …, p^τ_K, p^τ_rest)``, renormalised.

    The student's side: ``q̃ = (q_1, …, q_K, 1 − Σ_K q)`` from its full softmax at τ, so the
    divergence is computed on K + 1 outcomes. Its gradient returns to the vocabulary as
    ``∂D/∂u_x = g_x`` on the top-K ids and ``g_rest · q_x / q_rest`` elsewhere (u = z/τ).
    """

    log_probs: Tensor
    ids: Tensor
    tail_log_mass: Tensor
    vocab_size: int

    def __len__(self) -> int:
        return len(self.log_probs)

    def __getitem__(self, rows: Tensor) -> TopKTargets:
        return TopKTargets(self.log_probs[rows], self.ids[rows], self.tail_log_mass[rows], self.vocab_size)

    @property
    def has_rest(self) -> bool:
        """Whether there is a rest outcome: K < V."""
        return self.ids.shape[-1] < self.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.log_probs.dtype

    def for_matmuls(self, dtype: torch.dtype) -> TopKTargets:
        """These targets themselves: they run no matmul."""
        return self

    def detach(self) -> TopKTargets:
        return self

    def tempered_logits(self, rows: Tensor, inverse_temperature: Tensor | None) -> Tensor:
        """``log p̃`` of ``rows`` at their temperatures (``[n, K + 1]``, or ``[n, K]`` when K = V)."""
        log_probs = self.log_probs[rows]
        inverse_tau = None if inverse_temperature is None else inverse_temperature[rows].unsqueeze(-1).to(log_probs.dtype)
        top = log_probs if inverse_tau is None else log_probs * inverse_tau
        if not self.has_rest:
            return torch.log_softmax(top, -1)
        tail = self.tail_log_mass[rows].unsqueeze(-1).to(log_probs.dtype)
        if inverse_tau is not None:  # the tail spread evenly over its V − K ids, each re-tempered
            rest_ids = math.log(self.vocab_size - self.ids.shape[-1])
            tail = torch.where(tail > -torch.inf, rest_ids + (tail - rest_ids) * inverse_tau, tail)
        return torch.log_softmax(torch.cat([top, tail], -1), -1)

    def student_outcomes(self, student_logits: Tensor, rows: Tensor) -> Tensor:
        """``log q̃``: the student's log-probabilities of the top-K ids and of the rest (``[n, K + 1]``)."""
        ids = self.ids[rows]
        student_log_probs = torch.log_softmax(student_logits, -1)
        top = student_log_probs.gather(-1, ids)
        if not self.has_rest:
            return top
        rest = torch.logsumexp(student_log_probs.scatter(-1, ids, -torch.inf), -1, keepdim=True)
        return torch.cat([top, rest], -1)

    def vocabulary_gradient(self, outcome_gradient: Tensor, student_logits: Tensor, rows: Tensor) -> Tensor:
        """From ``∂D/∂ũ`` over the K + 1 outcomes to ``∂D/∂u`` over the vocabulary (u = z/τ):
        the top-K entries as they are, the rest's spread in proportion to q within the rest."""
        ids = self.ids[rows]
        top_gradient = outcome_gradient[..., : ids.shape[-1]]
        if not self.has_rest:
            return torch.zeros_like(student_logits).scatter(-1, ids, top_gradient)
        rest_logits = student_logits.scatter(-1, ids, -torch.inf)
        gradient = torch.softmax(rest_logits, -1) * outcome_gradient[..., -1:]
        return gradient.scatter(-1, ids, top_gradient)


def check_top_k_divergence(divergence) -> None:
    """Raise ``ValueError`` for a divergence that top-k targets cannot serve: CSD's uniform
    weighting weighs each vocabulary entry alike, which K + 1 outcomes do not have."""
    if getattr(divergence, "weighting", None) == "us":
        raise ValueError(
            "divergence.weighting=us (csd) weighs all V vocabulary entries alike, but a top-k teacher cache has "
            "K + 1 outcomes: use divergence.weighting=ss, ts or mix, or an exact cache (cache.format=exact)"
        )
