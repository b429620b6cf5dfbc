"""The Kullback–Leibler family: forward, reverse, Jensen–Shannon, skew and adaptive KL.

``p`` is the tempered teacher distribution, ``q`` the tempered student one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.losses.base import Divergence, check_open_unit, kl, log_mixture, softmax_gradient


class ForwardKL(Divergence):
    """Forward KL, mass-covering: ``D = KL(p ‖ q) = Σ p (log p − log q)``;
    ``∂D/∂(z/τ) = q − p``."""

    name = "fkl"

    def terms(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return student_log_probs, teacher_log_probs, teacher_log_probs.exp()

    def value(self, student_log_probs: Tensor, teacher_log_probs: Tensor, teacher_probs: Tensor) -> Tensor:
        return kl(teacher_log_probs, student_log_probs, teacher_probs)

    def gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor, teacher_probs: Tensor) -> Tensor:
        return student_log_probs.exp() - teacher_probs


class ReverseKL(Divergence):
    """Reverse KL, mode-seeking: ``D = KL(q ‖ p) = Σ q r`` with ``r = log q − log p``;
    ``∂D/∂(z/τ) = q ⊙ (r − E_q[r]) = q ⊙ (r − D)``."""

    name = "rkl"

    def terms(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor]:
        student_probs = student_log_probs.exp()
        # r where q > 0: masked entries (log q = −inf) give neither NaN values nor NaN gradients
        return student_probs, torch.where(student_probs > 0, student_log_probs - teacher_log_probs, 0.0)

    def value(self, student_probs: Tensor, log_ratio: Tensor) -> Tensor:
        return (student_probs * log_ratio).sum(-1)

    def gradient(self, student_probs: Tensor, log_ratio: Tensor) -> Tensor:
        return softmax_gradient(student_probs, log_ratio)


class JensenShannon(Divergence):
    """Generalised Jensen–Shannon divergence.

    ``m = β p + (1 − β) q``;  ``D = β KL(p ‖ m) + (1 − β) KL(q ‖ m)``, with 0 < β < 1.
    Symmetric in p and q at β = ½, bounded by the entropy of (β, 1 − β).
    ``∂D/∂(z/τ) = q ⊙ (a − E_q[a])`` with ``∂D/∂q = a = (1 − β)(log q − log m)``.
    """

    name = "jsd"

    def __init__(self, beta: float = 0.5):
        super().__init__()
        self.beta = check_open_unit("beta", beta)

    def terms(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        log_mix = log_mixture(teacher_log_probs, student_log_probs, self.beta)
        return student_log_probs, teacher_log_probs, student_log_probs.exp(), log_mix

    def value(self, student_log_probs: Tensor, teacher_log_probs: Tensor, student_probs: Tensor, log_mix: Tensor) -> Tensor:
        return self.beta * kl(teacher_log_probs, log_mix) + (1 - self.beta) * kl(student_log_probs, log_mix, student_probs)

    def gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor, student_probs: Tensor, log_mix: Tensor) -> Tensor:
        return softmax_gradient(student_probs, (1 - self.beta) * (student_log_probs - log_mix))

    def hparams(self) -> dict:
        return {"beta": self.beta}


class SkewKL(Divergence):
    """Skew forward KL (DistiLLM): ``D = KL(p ‖ m)`` with ``m = α p + (1 − α) q``, 0 < α < 1;
    ``∂D/∂(z/τ) = q ⊙ (a − E_q[a])`` with ``∂D/∂q = a = −(1 − α) p / m``."""

    name = "skl"

    def __init__(self, alpha: float = 0.1):
        super().__init__()
        self.alpha = check_open_unit("alpha", alpha)

    def terms(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return student_log_probs, teacher_log_probs, log_mixture(teacher_log_probs, student_log_probs, self.alpha)

    def value(self, student_log_probs: Tensor, teacher_log_probs: Tensor, log_mix: Tensor) -> Tensor:
        return kl(teacher_log_probs, log_mix)

    def gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor, log_mix: Tensor) -> Tensor:
        return softmax_gradient(student_log_probs.exp(), -(1 - self.alpha) * (teacher_log_probs - log_mix).exp())

    def hparams(self) -> dict:
        return {"alpha": self.alpha}


class SkewReverseKL(SkewKL):
    """Skew reverse KL (DistiLLM): ``D = KL(q ‖ m)`` with ``m = (1 − α) p + α q``, 0 < α < 1;
    ``∂D/∂(z/τ) = q ⊙ (a − E_q[a])`` with ``∂D/∂q = a = log q − log m − α q / m``."""

    name = "srkl"

    def terms(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        log_mix = log_mixture(teacher_log_probs, student_log_probs, 1 - self.alpha)
        return student_log_probs, student_log_probs.exp(), log_mix

    def value(self, student_log_probs: Tensor, student_probs: Tensor, log_mix: Tensor) -> Tensor:
        return kl(student_log_probs, log_mix, student_probs)

    def gradient(self, student_log_probs: Tensor, student_probs: Tensor, log_mix: Tensor) -> Tensor:
        log_ratio = student_log_probs - log_mix
        return softmax_gradient(student_probs, log_ratio - self.alpha * log_ratio.exp())


class AdaptiveKL(Divergence):
    """Adaptive KL: ``D = g · KL(p ‖ q) + (1 − g) · KL(q ‖ p)``.

    Sort the vocabulary by p, descending; the head H is the smallest prefix whose
    cumulative p mass is ≥ μ. ``g = Σ_{x∈H} |p_x − q_x| / Σ_x |p_x − q_x|``, computed
    without gradient (g = ½ when the denominator is 0): the forward KL weighs the gap
    on the teacher's head, the reverse KL the gap on its tail. 0 < μ < 1.
    With g held constant, ``∂D/∂(z/τ) = g · (q − p) + (1 − g) · q ⊙ (r − KL(q ‖ p))``,
    ``r = log q − log p``.
    """

    name = "akl"

    def __init__(self, mu: float = 0.5):
        super().__init__()
        self.mu = check_open_unit("mu", mu)

    def terms(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, ...]:
        """g, p, q, r where q > 0, and the two KLs (each entry with zero weight adds 0)."""
        head_weight = self.head_weight(student_log_probs, teacher_log_probs)
        student_probs, teacher_probs = student_log_probs.exp(), teacher_log_probs.exp()
        log_ratio = student_log_probs - teacher_log_probs
        forward = (teacher_probs * torch.where(teacher_probs > 0, -log_ratio, 0.0)).sum(-1)
        reverse_terms = torch.where(student_probs > 0, log_ratio, 0.0)
        reverse = (student_probs * reverse_terms).sum(-1)
        return head_weight, teacher_probs, student_probs, reverse_terms, forward, reverse

    def value(
        self, head_weight: Tensor, teacher_probs: Tensor, student_probs: Tensor, reverse_terms: Tensor, forward: Tensor,
        reverse: Tensor,
    ) -> Tensor:
        return head_weight * forward + (1 - head_weight) * reverse

    def gradient(
        self, head_weight: Tensor, teacher_probs: Tensor, student_probs: Tensor, reverse_terms: Tensor, forward: Tensor,
        reverse: Tensor,
    ) -> Tensor:
        head_weight = head_weight.unsqueeze(-1)
        return head_weight * (student_probs - teacher_probs) + (1 - head_weight) * student_probs * (
            reverse_terms - reverse.unsqueeze(-1)
        )

    @torch.no_grad()
    def head_weight(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """g per token: the share of the total |p − q| gap that lies on the head of p."""
        teacher_probs = teacher_log_probs.exp()
        gap = (teacher_probs - student_log_probs.exp()).abs()
        total_gap = gap.sum(-1)
        head_gap = (gap * self.in_head(teacher_probs)).sum(-1)
        return torch.where(total_gap > 0, head_gap / total_gap, 0.5)

    def in_head(self, probs: Tensor) -> Tensor:
        """Whether each entry belongs to the smallest set of largest probabilities holding
        mass ≥ μ, without sorting the vocabulary.

        A peaked distribution has its head among its top 16 entries (one ``topk``). For
        the other tokens the head is ``{p ≥ θ}``, θ the largest probability whose upper
        set still holds μ, found by a radix select on the bit patterns of the
        probabilities (non-negative floats order as their bits do), 12 bits a round:
        a few passes over the vocabulary, each a histogram of the mass.
        """
        top = min(16, probs.shape[-1])
        top_probs = probs.topk(top, dim=-1).values
        mass_before = torch.nn.functional.pad(top_probs.cumsum(-1)[..., :-1], (1, 0))
        threshold = torch.where(mass_before < self.mu, top_probs, torch.inf).amin(-1)  # the last head entry
        unresolved = top_probs.sum(-1) < self.mu
        if unresolved.any():
            threshold[unresolved] = self.radix_threshold(probs[unresolved])
        return probs >= threshold.unsqueeze(-1)

    def radix_threshold(self, probs: Tensor) -> Tensor:
        """θ per row of ``probs`` ``[n, V]``: the largest value whose upper set holds μ."""
        int_dtype, value_bits = (torch.int64, 63) if probs.dtype == torch.float64 else (torch.int32, 31)
        bits = probs.view(int_dtype)
        prefix = torch.zeros(len(probs), dtype=int_dtype, device=probs.device)  # θ's bits found so far
        mass_above = torch.zeros(len(probs), dtype=probs.dtype, device=probs.device)  # mass above θ's range
        shift = value_bits
        while shift > 0:
            width = min(12, shift)
            shift -= width
            in_range = (bits >> (shift + width)) == (prefix >> (shift + width)).unsqueeze(-1)
            digits = ((bits >> shift) & ((1 << width) - 1)).long()
            digit_mass = torch.zeros(len(probs), 1 << width, dtype=probs.dtype, device=probs.device)
            digit_mass.scatter_add_(1, digits, torch.where(in_range, probs, 0.0))
            mass_from = digit_mass.flip(-1).cumsum(-1).flip(-1) + mass_above.unsqueeze(-1)  # digits ≥ d
            holds = mass_from >= self.mu  # true for the small digits, false above θ's digit
            digit = (holds * torch.arange(1 << width, device=probs.device)).amax(-1)
            mass_above = mass_from.gather(-1, digit.unsqueeze(-1)).squeeze(-1) - digit_mass.gather(
                -1, digit.unsqueeze(-1)
            ).squeeze(-1)
            prefix = prefix | (digit.to(int_dtype) << shift)
        return prefix.view(probs.dtype)

    def hparams(self) -> dict:
        return {"mu": self.mu}
