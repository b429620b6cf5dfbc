"""Concrete Score Distillation: match the logit differences of all vocabulary pairs."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from kd_lightning.losses.base import Divergence

WEIGHTINGS = ("ss", "us", "ts", "mix")


class ConcreteScore(Divergence):
    """Concrete Score Distillation (CSD).

    With ``Δ = (z − t)/τ`` and two weightings w1, w2 over the vocabulary (distributions,
    computed without gradient)::

        D = ¼ Σ_x Σ_y w1_x w2_y (Δ_x − Δ_y)²
          = ¼ (E_w1[Δ²] − 2 E_w1[Δ] E_w2[Δ] + E_w2[Δ²])
          = ¼ (Var_w1[Δ] + Var_w2[Δ] + (E_w1[Δ] − E_w2[Δ])²)

    The last form is what is computed: O(V) per token, never a V×V tensor, a sum of
    non-negative terms, and exactly invariant to adding a constant to z or to t (so
    ``Δ = log q − log p`` serves as well as ``(z − t)/τ``).

    =========  =======================  ==========
    weighting  w1                       w2
    =========  =======================  ==========
    ``ss``     q                        q
    ``us``     uniform 1/V              q
    ``ts``     p                        q
    ``mix``    mix·p + (1 − mix)·q      same as w1
    =========  =======================  ==========

    The gradient with respect to z is ``½ (w1 ⊙ (Δ − E_w2[Δ]) + w2 ⊙ (Δ − E_w1[Δ])) / τ``;
    with ``ss`` it equals the gradient of RKL at the same τ. Under a masked vocabulary
    the uniform weighting spreads over the entries that are not masked on both sides.
    """

    name = "csd"
    clamp_at_zero = False  # the variance form is a sum of non-negative terms

    def __init__(self, weighting: str = "ss", mix: float = 0.5):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown csd weighting {weighting!r}; valid weightings: {', '.join(WEIGHTINGS)}")
        if isinstance(mix, bool) or not isinstance(mix, Real) or not 0 <= mix <= 1:
            raise ValueError(f"csd mix must be a number with 0 <= mix <= 1, got {mix!r}")
        self.weighting, self.mix = weighting, float(mix)

    def terms(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, ...]:
        """w1, w2, ``Δ = log q − log p`` (a per-token shift of (z − t)/τ) with non-finite
        entries zeroed, the means ``E_w1[Δ]`` and ``E_w2[Δ]`` (``[..., 1]``), and which
        tokens have D = +inf.

        A logit masked on one side makes Δ infinite: D = +inf if that entry has weight,
        and the entry adds nothing otherwise (masked on both sides, Δ is NaN).
        """
        first_weights, second_weights = self.weights(student_log_probs, teacher_log_probs)
        delta = student_log_probs - teacher_log_probs
        finite = delta.isfinite()
        infinite = (~finite & ((first_weights > 0) | (second_weights > 0))).any(-1)
        delta = torch.where(finite, delta, torch.zeros_like(delta))
        first_mean = (first_weights * delta).sum(-1, keepdim=True)
        second_mean = (second_weights * delta).sum(-1, keepdim=True)
        return first_weights, second_weights, delta, first_mean, second_mean, infinite

    def value(
        self, first_weights: Tensor, second_weights: Tensor, delta: Tensor, first_mean: Tensor, second_mean: Tensor,
        infinite: Tensor,
    ) -> Tensor:
        """``¼ (Var_w1[Δ] + Var_w2[Δ] + (E_w1[Δ] − E_w2[Δ])²)``."""
        first_variance = (first_weights * (delta - first_mean).square()).sum(-1)
        second_variance = (second_weights * (delta - second_mean).square()).sum(-1)
        divergence = 0.25 * (first_variance + second_variance + (first_mean - second_mean).squeeze(-1).square())
        return divergence.masked_fill(infinite, torch.inf)

    def gradient(
        self, first_weights: Tensor, second_weights: Tensor, delta: Tensor, first_mean: Tensor, second_mean: Tensor,
        infinite: Tensor,
    ) -> Tensor:
        """``½ (w1 ⊙ (Δ − E_w2[Δ]) + w2 ⊙ (Δ − E_w1[Δ]))``; it sums to 0 over the vocabulary."""
        return 0.5 * (first_weights * (delta - second_mean) + second_weights * (delta - first_mean))

    @torch.no_grad()
    def weights(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor]:
        """The weightings (w1, w2) of the table above."""
        student_probs, teacher_probs = student_log_probs.exp(), teacher_log_probs.exp()
        if self.weighting == "ss":
            return student_probs, student_probs
        if self.weighting == "ts":
            return teacher_probs, student_probs
        if self.weighting == "mix":
            mixture = self.mix * teacher_probs + (1 - self.mix) * student_probs
            return mixture, mixture
        unmasked = ((student_log_probs > -torch.inf) | (teacher_log_probs > -torch.inf)).to(student_probs.dtype)
        return unmasked / unmasked.sum(-1, keepdim=True), student_probs

    def hparams(self) -> dict:
        return {"weighting": self.weighting, "mix": self.mix}
