"""Token selection and per-token temperature (SPEC §3): LATF, IDTS and AdaKD = both.

Each policy is a Lightning callback (``tokens.TokenPolicy``) that the module finds among
the trainer's callbacks and calls with a ``TokenBatch`` of the counted tokens of each
training batch, before the loss. Under several processes both policies decide on
the global batch: the difficulties of all ranks are gathered, so the kept set and the
median are those of the whole batch, identical on every rank.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from kd_lightning.schedule import total_steps
from kd_lightning.tokens import TokenBatch, TokenPolicy


class LossAdaptiveTokenFocusing(TokenPolicy):
    """LATF: keep the ⌈r·N⌉ hardest counted tokens, with r driven by the loss trend.

    r starts at 1. During warm-up (the first ``warmup_fraction`` of the training steps,
    or ``warmup_steps``) r stays 1 and the EMA of the distillation loss (``beta``) is
    tracked; at its end ``L_ref = EMA``. Then after every step: if
    ``EMA < L_ref·(1 − ε)``, ``r ← max(r_min, r·(1 − δ))`` and ``L_ref ← EMA`` (the
    loss falls: focus on fewer, harder tokens); if ``EMA > L_ref·(1 + ε)``,
    ``r ← min(1, r·(1 + δ))`` and ``L_ref ← EMA``. Difficulty is the Hellinger distance
    between p and q at τ = 1.
    """

    def __init__(
        self,
        beta: float = 0.99,
        epsilon: float = 0.05,
        delta: float = 0.05,
        min_ratio: float = 0.1,
        warmup_fraction: float = 0.05,
        warmup_steps: int | None = None,
    ):
        if not 0 < min_ratio <= 1:
            raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta, self.epsilon, self.delta, self.min_ratio = beta, epsilon, delta, min_ratio
        self.warmup_fraction, self.warmup_steps = warmup_fraction, warmup_steps
        self.ratio, self.ema_loss, self.reference_loss, self.steps = 1.0, None, None, 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.warmup_steps is None:
            self.warmup_steps = math.ceil(self.warmup_fraction * total_steps(trainer))

    def __call__(self, tokens: TokenBatch) -> None:
        if self.ratio >= 1:
            return
        difficulty = tokens.difficulty()
        candidates = difficulty.masked_fill(~tokens.keep, -torch.inf)
        everyone = self.global_values(candidates)
        kept_count = math.ceil(self.ratio * int((everyone > -torch.inf).sum()))
        if everyone is candidates:  # one process: exactly the top k
            keep = torch.zeros_like(tokens.keep)
            keep[candidates.topk(kept_count).indices] = True
        else:  # the global k-th largest difficulty is the same threshold on every rank
            threshold = everyone.topk(kept_count).values[-1]
            keep = candidates >= threshold
        tokens.keep = tokens.keep & keep

    def update(self, loss: float) -> None:
        """Track the loss of one training step and move the ratio (pure logic, testable)."""
        self.steps += 1
        self.ema_loss = loss if self.ema_loss is None else self.beta * self.ema_loss + (1 - self.beta) * loss
        if self.steps <= (self.warmup_steps or 0):
            if self.steps == self.warmup_steps:
                self.reference_loss = self.ema_loss
            return
        if self.reference_loss is None:  # no warm-up at all
            self.reference_loss = self.ema_loss
        if self.ema_loss < self.reference_loss * (1 - self.epsilon):
            self.ratio = max(self.min_ratio, self.ratio * (1 - self.delta))
            self.reference_loss = self.ema_loss
        elif self.ema_loss > self.reference_loss * (1 + self.epsilon):
            self.ratio = min(1.0, self.ratio * (1 + self.delta))
            self.reference_loss = self.ema_loss

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # each process holds its share of the global batch's loss, scaled so that their mean
        # is the loss: every process tracks that mean, so all keep the same ratio (and all
        # take part in the gathers of __call__)
        self.update(float(trainer.strategy.reduce(outputs["kd_loss"], reduce_op="mean")))
        pl_module.log_dict({"selection/ratio": self.ratio, "selection/ema_loss": self.ema_loss})

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("ratio", "ema_loss", "reference_loss", "steps", "warmup_steps")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            setattr(self, key, value)


class InverseDifficultyTemperature(TokenPolicy):
    """IDTS: one temperature per kept token, lower for harder tokens.

    ``ŝ_i = tanh(log(s_i / median(s)))`` over the kept tokens, ``τ_i = τ_base·exp(−c·ŝ_i)``
    with ``τ_base`` the configured temperature, computed without gradient; the module
    then weighs the token by ``τ_i²·D(p^{τ_i}, q^{τ_i})``. Runs after LATF when both are on.
    """

    def __init__(self, c: float = 0.5, eps: float = 1e-12):
        self.c, self.eps = c, eps

    def __call__(self, tokens: TokenBatch) -> None:
        difficulty = tokens.difficulty().clamp_min(self.eps)
        kept = self.global_values(difficulty.masked_fill(~tokens.keep, torch.nan))
        median = kept.nanquantile(0.5) if (~kept.isnan()).any() else difficulty.new_tensor(1.0)
        scaled = torch.tanh(torch.log(difficulty / median))
        tokens.temperature = tokens.temperature * torch.exp(-self.c * scaled)
