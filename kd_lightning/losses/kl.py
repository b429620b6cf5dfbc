"""The Kullback–Leibler family: forward, reverse, Jensen–Shannon, skew and adaptive KL.

``p`` is the tempered teacher distribution, ``q`` the tempered student one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.losses.base import Divergence, check_open_unit, kl, log_mixture, softmax_gradient


class ForwardKL(Divergence):
    """Forward KL, mass-covering: ``D = KL(p ‖ q) = Σ p (log p − log q)``."""

    name = "fkl"

    def token_divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return kl(teacher_log_probs, student_log_probs)

    def logit_gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """``q − p``."""
        return student_log_probs.exp() - teacher_log_probs.exp()


class ReverseKL(Divergence):
    """Reverse KL, mode-seeking: ``D = KL(q ‖ p) = Σ q (log q − log p)``."""

    name = "rkl"

    def token_divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return kl(student_log_probs, teacher_log_probs)

    def logit_gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """``q ⊙ (r − E_q[r])`` with ``r = log q − log p``."""
        return softmax_gradient(student_log_probs.exp(), student_log_probs - teacher_log_probs)


class JensenShannon(Divergence):
    """Generalised Jensen–Shannon divergence.

    ``m = β p + (1 − β) q``;  ``D = β KL(p ‖ m) + (1 − β) KL(q ‖ m)``, with 0 < β < 1.
    Symmetric in p and q at β = ½, bounded by the entropy of (β, 1 − β).
    """

    name = "jsd"

    def __init__(self, beta: float = 0.5):
        super().__init__()
        self.beta = check_open_unit("beta", beta)

    def token_divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        log_m = log_mixture(teacher_log_probs, student_log_probs, self.beta)
        return self.beta * kl(teacher_log_probs, log_m) + (1 - self.beta) * kl(student_log_probs, log_m)

    def logit_gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """``q ⊙ (a − E_q[a])`` with ``∂D/∂q = a = (1 − β)(log q − log m)``."""
        log_m = log_mixture(teacher_log_probs, student_log_probs, self.beta)
        return softmax_gradient(student_log_probs.exp(), (1 - self.beta) * (student_log_probs - log_m))

    def hparams(self) -> dict:
        return {"beta": self.beta}


class SkewKL(Divergence):
    """Skew forward KL (DistiLLM): ``D = KL(p ‖ α p + (1 − α) q)``, with 0 < α < 1."""

    name = "skl"

    def __init__(self, alpha: float = 0.1):
        super().__init__()
        self.alpha = check_open_unit("alpha", alpha)

    def token_divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return kl(teacher_log_probs, log_mixture(teacher_log_probs, student_log_probs, self.alpha))

    def logit_gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """``q ⊙ (a − E_q[a])`` with ``∂D/∂q = a = −(1 − α) p / m``."""
        log_m = log_mixture(teacher_log_probs, student_log_probs, self.alpha)
        return softmax_gradient(student_log_probs.exp(), -(1 - self.alpha) * (teacher_log_probs - log_m).exp())

    def hparams(self) -> dict:
        return {"alpha": self.alpha}


class SkewReverseKL(SkewKL):
    """Skew reverse KL (DistiLLM): ``D = KL(q ‖ (1 − α) p + α q)``, with 0 < α < 1."""

    name = "srkl"

    def token_divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        return kl(student_log_probs, log_mixture(teacher_log_probs, student_log_probs, 1 - self.alpha))

    def logit_gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """``q ⊙ (a − E_q[a])`` with ``∂D/∂q = a = log q − log m − α q / m``."""
        log_ratio = student_log_probs - log_mixture(teacher_log_probs, student_log_probs, 1 - self.alpha)
        return softmax_gradient(student_log_probs.exp(), log_ratio - self.alpha * log_ratio.exp())


class AdaptiveKL(Divergence):
    """Adaptive KL: ``D = g · KL(p ‖ q) + (1 − g) · KL(q ‖ p)``.

    Sort the vocabulary by p, descending; the head H is the smallest prefix whose
    cumulative p mass is ≥ μ. ``g = Σ_{x∈H} |p_x − q_x| / Σ_x |p_x − q_x|``, computed
    without gradient (g = ½ when the denominator is 0): the forward KL weighs the gap
    on the teacher's head, the reverse KL the gap on its tail. 0 < μ < 1.
    """

    name = "akl"

    def __init__(self, mu: float = 0.5):
        super().__init__()
        self.mu = check_open_unit("mu", mu)

    def token_divergence(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        head_weight = self.head_weight(student_log_probs, teacher_log_probs)
        forward = kl(teacher_log_probs, student_log_probs)
        reverse = kl(student_log_probs, teacher_log_probs)
        return head_weight * forward + (1 - head_weight) * reverse

    def logit_gradient(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """``g · (q − p) + (1 − g) · q ⊙ (r − E_q[r])``, g held constant."""
        head_weight = self.head_weight(student_log_probs, teacher_log_probs).unsqueeze(-1)
        student_probs = student_log_probs.exp()
        forward = student_probs - teacher_log_probs.exp()
        reverse = softmax_gradient(student_probs, student_log_probs - teacher_log_probs)
        return head_weight * forward + (1 - head_weight) * reverse

    @torch.no_grad()
    def head_weight(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """g per token: the share of the total |p − q| gap that lies on the head of p."""
        teacher_probs = teacher_log_probs.exp()
        gap = (teacher_probs - student_log_probs.exp()).abs()
        sorted_probs, order = teacher_probs.sort(dim=-1, descending=True)
        # x is in the head when the mass sorted before it is still short of μ
        mass_before = torch.nn.functional.pad(sorted_probs.cumsum(-1)[..., :-1], (1, 0))
        in_head = mass_before < self.mu
        head_gap = (gap.gather(-1, order) * in_head).sum(-1)
        total_gap = gap.sum(-1)
        return torch.where(total_gap > 0, head_gap / total_gap, torch.full_like(total_gap, 0.5))

    def hparams(self) -> dict:
        return {"mu": self.mu}
