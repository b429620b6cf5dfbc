"""Divergences outside the KL family: total variation and the alpha-beta divergence."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from kd_lightning.losses.base import Divergence, softmax_gradient


class TotalVariation(Divergence):
    """Total variation distance: ``D = ½ Σ |p − q|`` (between 0 and 1);
    ``∂D/∂(z/τ) = q ⊙ (a − E_q[a])`` with ``∂D/∂q = a = ½ sign(q − p)``."""

    name = "tvd"
    clamp_at_zero = False  # a sum of non-negative terms

    def terms(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor]:
        student_probs = student_log_probs.exp()
        return student_probs, student_probs - teacher_log_probs.exp()

    def value(self, student_probs: Tensor, gap: Tensor) -> Tensor:
        return 0.5 * gap.abs().sum(-1)

    def gradient(self, student_probs: Tensor, gap: Tensor) -> Tensor:
        return softmax_gradient(student_probs, 0.5 * torch.sign(gap))


class AlphaBeta(Divergence):
    """Alpha-beta divergence (ABKD), with α > 0 and β > 0:

    ``D = −1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)]``.

    Each bracket is ≤ 0 by the weighted AM–GM inequality, so D ≥ 0 with equality iff
    p = q. Powers are taken as ``exp(α log p)``, exact for tiny and zero probabilities.
    (α, β) → (1, 0) approaches FKL, (0, 1) approaches RKL.
    """

    name = "abkd"

    def __init__(self, alpha: float = 0.2, beta: float = 0.7):
        super().__init__()
        for key, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
                raise ValueError(f"abkd needs {key} > 0 (powers of zero probabilities must stay finite), got {value!r}")
        self.alpha, self.beta = float(alpha), float(beta)

    def terms(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """log q, log p, ``p^α q^β`` and ``q^(α+β)``."""
        cross = torch.exp(self.alpha * teacher_log_probs + self.beta * student_log_probs)
        student_power = torch.exp((self.alpha + self.beta) * student_log_probs)
        return student_log_probs, teacher_log_probs, cross, student_power

    def value(self, student_log_probs: Tensor, teacher_log_probs: Tensor, cross: Tensor, student_power: Tensor) -> Tensor:
        alpha, beta = self.alpha, self.beta
        total = alpha + beta
        teacher_power = torch.exp(total * teacher_log_probs)
        bracket = cross - alpha / total * teacher_power - beta / total * student_power
        return -bracket.sum(-1) / (alpha * beta)

    def gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor, cross: Tensor, student_power: Tensor) -> Tensor:
        """``b − q Σ b`` with ``b = q ⊙ ∂D/∂q = −(p^α q^β − q^(α+β)) / α``."""
        weighted = -(cross - student_power) / self.alpha
        return weighted - student_log_probs.exp() * weighted.sum(-1, keepdim=True)

    def hparams(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}
