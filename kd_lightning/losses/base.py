"""The common shape of every divergence: tempered log-probabilities in, D per token out.

Notation (SPEC §1): student logits ``z``, teacher logits ``t``, temperature ``τ``;
``q = softmax(z / τ)`` (student) and ``p = softmax(t / τ)`` (teacher). A divergence
returns ``D(p, q)`` per token, without any τ² factor, in float32 (float64 when an input
is float64) whatever the input dtype.

Every divergence is written on the tempered log-probabilities ``log q`` and ``log p``.
Working in log space keeps the mixtures exact for tiny probabilities, and entries whose
logit is ``-inf`` (a masked vocabulary) contribute nothing: ``0 · log 0 = 0``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor, nn


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 and fp16 compute in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_temperature(temperature: float | Tensor) -> None:
    """Raise ``ValueError`` unless every temperature is a finite number > 0."""
    if isinstance(temperature, Tensor):
        # one host sync per call: a silently wrong τ costs far more than that
        if not bool(torch.isfinite(temperature).all() and (temperature > 0).all()):
            raise ValueError(
                "temperature must be finite and > 0 for every token; got a tensor with "
                f"min {temperature.min().item()} — use a positive τ (e.g. temperature=1.0)"
            )
    elif not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}; use e.g. temperature=1.0")


def check_vocabularies(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Raise ``ValueError`` unless student and teacher logits have the same shape."""
    student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"vocabulary sizes differ: student logits have {student_vocab} entries, teacher "
            f"logits have {teacher_vocab}; slice both to the shared tokenizer size "
            "(kd_lightning.models aligns padding beyond it) or use models with one tokenizer"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )


def tempered_log_probs(logits: Tensor, temperature: float | Tensor, dtype: torch.dtype) -> Tensor:
    """``log softmax(logits / τ)`` in ``dtype``; a tensor τ holds one value per token."""
    if isinstance(temperature, Tensor):
        temperature = temperature.to(device=logits.device, dtype=dtype).unsqueeze(-1)
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def kl(log_a: Tensor, log_b: Tensor, a: Tensor | None = None) -> Tensor:
    """``KL(a ‖ b) = Σ a (log a − log b)`` over the last dim; entries with a = 0 add 0.
    ``a = exp(log_a)`` when already at hand.

    The ``where`` sits before the product so that masked entries (``log a = −inf``)
    give neither NaN values nor NaN gradients.
    """
    a = log_a.exp() if a is None else a
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w·a + (1 − w)·b)`` computed with logaddexp (exact for tiny probabilities).

    ``−inf`` inputs are clamped to the dtype's lowest finite value first: the mixture is
    then finite everywhere and its gradient has no ``exp(−inf + inf)`` NaN.
    """
    lowest = torch.finfo(log_a.dtype).min
    return torch.logaddexp(
        log_a.clamp_min(lowest) + math.log(weight_a),
        log_b.clamp_min(lowest) + math.log1p(-weight_a),
    )


def softmax_gradient(probs: Tensor, outer_gradient: Tensor) -> Tensor:
    """The gradient with respect to logits u of a function of ``probs = softmax(u)``,
    given its gradient ``a`` with respect to the probabilities: ``probs ⊙ (a − E_probs[a])``.
    Entries of probability 0 contribute nothing (their ``a`` may be infinite)."""
    outer_gradient = torch.where(probs > 0, outer_gradient, 0.0)
    return probs * (outer_gradient - (probs * outer_gradient).sum(-1, keepdim=True))


def check_open_unit(name: str, value: float) -> float:
    """Return ``value`` as a float if 0 < value < 1, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number with 0 < {name} < 1, got {value!r}")
    return float(value)


class Divergence(nn.Module):
    """Base class: validates and tempers the logits, subclasses supply the formula.

    ``forward(student_logits, teacher_logits, temperature)`` takes logits ``[..., V]`` of
    any float dtype and a temperature that is a float or a tensor broadcastable to
    ``logits.shape[:-1]``, and returns D per token with shape ``logits.shape[:-1]``,
    differentiable with respect to ``student_logits``.

    A subclass states its formula once, on the tempered log-probabilities ``log q`` and
    ``log p``: ``terms(log q, log p)`` computes what value and gradient share, ``value``
    gives D per token from them and ``gradient`` gives ``∂D/∂(z/τ)`` (without autograd:
    the fused path uses it; divide by τ for ``∂D/∂z``).
    """

    name: str = ""
    #: divergences that are sums of non-negative terms need no clamp; the rest subtract
    #: nearly equal numbers, and rounding must not make D < 0 (notably from bf16 inputs)
    clamp_at_zero: bool = True

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
        check_vocabularies(student_logits, teacher_logits)
        check_temperature(temperature)
        dtype = compute_dtype(student_logits, teacher_logits)
        return self.values(
            tempered_log_probs(student_logits, temperature, dtype), tempered_log_probs(teacher_logits, temperature, dtype)
        )

    def values(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
        """D per token from the tempered log-probabilities, clamped at 0 where rounding
        could make it negative."""
        return self.nonnegative(self.value(*self.terms(student_log_probs, teacher_log_probs)))

    def values_and_logit_gradients(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple[Tensor, Tensor]:
        """D per token (as ``values``) and ``∂D/∂(z/τ)``, from one set of terms."""
        terms = self.terms(student_log_probs, teacher_log_probs)
        return self.nonnegative(self.value(*terms)), self.gradient(*terms)

    def nonnegative(self, values: Tensor) -> Tensor:
        """``values`` clamped at 0 where rounding could make a divergence negative."""
        return values.clamp_min(0) if self.clamp_at_zero else values

    def terms(self, student_log_probs: Tensor, teacher_log_probs: Tensor) -> tuple:
        """What ``value`` and ``gradient`` share, computed once (by default the two
        log-probabilities themselves)."""
        return student_log_probs, teacher_log_probs

    def value(self, *terms: Tensor) -> Tensor:
        """D per token, ``[...]``, from ``terms``."""
        raise NotImplementedError

    def gradient(self, *terms: Tensor) -> Tensor:
        """``∂D/∂(z/τ)`` per token, ``[..., V]``, from ``terms``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.hparams().items())

    def hparams(self) -> dict:
        """The parameters that define this divergence (what ``losses.get`` takes)."""
        return {}


@torch.no_grad()
def hellinger(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Hellinger distance per token at τ = 1, without gradient (a token's difficulty):

    ``s = ‖√p − √q‖₂ / √2 = √(1 − Σ √(p q))``, between 0 (p = q) and 1 (disjoint supports).
    """
    check_vocabularies(student_logits, teacher_logits)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = tempered_log_probs(student_logits, 1.0, dtype)
    log_p = tempered_log_probs(teacher_logits, 1.0, dtype)
    bhattacharyya = torch.exp(0.5 * (log_p + log_q)).sum(-1)
    return (1 - bhattacharyya).clamp_min(0).sqrt()
