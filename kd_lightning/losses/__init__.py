"""Divergences for distillation, in pure torch, behind a small registry.

>>> from kd_lightning import losses
>>> losses.available()
['abkd', 'akl', 'csd', 'fkl', 'jsd', 'rkl', 'skl', 'srkl', 'tvd']
>>> divergence = losses.get("jsd", beta=0.3)
>>> per_token = divergence(student_logits, teacher_logits, temperature=2.0)  # doctest: +SKIP
"""

from __future__ import annotations

from kd_lightning.losses import cross_tokenizer  # objective(name, divergence, **params): uld, gold, hybrid
from kd_lightning.losses.base import Divergence, hellinger
from kd_lightning.losses.csd import ConcreteScore
from kd_lightning.losses.distances import AlphaBeta, TotalVariation
from kd_lightning.losses.fused import fused_divergence, fused_linear_divergence
from kd_lightning.losses.kl import AdaptiveKL, ForwardKL, JensenShannon, ReverseKL, SkewKL, SkewReverseKL
from kd_lightning.losses.targets import LinearTargets, TopKTargets

_REGISTRY: dict[str, type[Divergence]] = {
    cls.name: cls
    for cls in (ForwardKL, ReverseKL, JensenShannon, TotalVariation, SkewKL, SkewReverseKL, AdaptiveKL, AlphaBeta, ConcreteScore)
}


def available() -> list[str]:
    """The names ``get`` accepts, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **params) -> Divergence:
    """The divergence called ``name``, built with ``params`` (see SPEC §2 for each).

    Raises ``ValueError`` for an unknown name (listing the valid ones), an unknown
    parameter (listing the accepted ones) or a parameter out of range.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown divergence {name!r}; valid divergences: {', '.join(available())}")
    cls = _REGISTRY[name]
    accepted = cls().hparams()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) or "none"
        raise ValueError(f"divergence {name!r} takes no parameter {', '.join(unknown)}; its parameters: {allowed}")
    return cls(**params)


def resolve(divergence: str | Divergence, params: dict | None = None) -> Divergence:
    """``divergence`` itself, or the one ``get`` builds from its name and ``params``."""
    if isinstance(divergence, str):
        return get(divergence, **(params or {}))
    if params:
        raise ValueError("divergence_kwargs go with a divergence name, not a Divergence instance")
    return divergence


__all__ = [
    "AdaptiveKL",
    "AlphaBeta",
    "ConcreteScore",
    "Divergence",
    "ForwardKL",
    "JensenShannon",
    "LinearTargets",
    "ReverseKL",
    "SkewKL",
    "SkewReverseKL",
    "TopKTargets",
    "TotalVariation",
    "available",
    "cross_tokenizer",
    "fused_divergence",
    "fused_linear_divergence",
    "get",
    "hellinger",
    "resolve",
]
