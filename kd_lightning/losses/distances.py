"""Divergences outside the KL family: total variation and the alpha-beta divergence."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from kd_lightning.losses.base import Divergence, softmax_gradient


class TotalVariation(Divergence):
    """Total variation distance: ``D = ½ Σ |p − q|`` (between 0 and 1)."""

    name = "tvd"
    clamp_at_zero = False  # a sum of non-negative terms

    def token_divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)

    def logit_gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """``q ⊙ (a − E_q[a])`` with ``∂D/∂q = a = ½ sign(q − p)``."""
        student_probs = student_log_probs.exp()
        return softmax_gradient(student_probs, 0.5 * torch.sign(student_probs - teacher_log_probs.exp()))


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

    def token_divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        alpha, beta = self.alpha, self.beta
        total = alpha + beta
        cross = torch.exp(alpha * teacher_log_probs + beta * student_log_probs)
        teacher_power = torch.exp(total * teacher_log_probs)
        student_power = torch.exp(total * student_log_probs)
        bracket = cross - alpha / total * teacher_power - beta / total * student_power
        return -bracket.sum(-1) / (alpha * beta)

    def logit_gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """``b − q Σ b`` with ``b = q ⊙ ∂D/∂q = −(p^α q^β − q^(α+β)) / α``."""
        alpha, beta = self.alpha, self.beta
        cross = torch.exp(alpha * teacher_log_probs + beta * student_log_probs)
        weighted = -(cross - torch.exp((alpha + beta) * student_log_probs)) / alpha
        return weighted - student_log_probs.exp() * weighted.sum(-1, keepdim=True)

    def hparams(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}
