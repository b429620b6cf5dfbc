"""What token policies (SPEC §3) see and edit, and the callback they all are.

Before the loss of each training batch the module builds a ``TokenBatch`` of its
counted tokens, at the module's τ for this step, and hands it to every ``TokenPolicy``
among the trainer's callbacks (and in its own ``token_policies``), in order. Policies
narrow ``keep`` and set per-token temperatures on that copy; the module then computes
the divergence on the kept tokens only, at their temperatures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """The counted tokens of one training batch, as token policies edit them."""

    temperature: Tensor  # [N] float32, the module's τ for this step to start with
    keep: Tensor  # [N] bool, all True to start with
    step: int  # the trainer's global step
    compute_difficulty: Callable[[], Tensor] = field(repr=False)
    _difficulty: Tensor | None = field(default=None, repr=False)

    def difficulty(self) -> Tensor:
        """Hellinger distance between p and q at τ = 1 per token (SPEC §3), no gradient;
        computed once, on first use."""
        if self._difficulty is None:
            self._difficulty = self.compute_difficulty()
        return self._difficulty

    def loss_weights(self, scale_by_tau_sq: bool) -> Tensor:
        """The weight of each kept token's divergence: ``τ_i²`` (``scale_by_tau_sq``) or 1."""
        temperature = self.temperature[self.keep]
        return temperature.square() if scale_by_tau_sq else torch.ones_like(temperature)


class TokenPolicy(L.Callback):
    """A token policy: ``__call__`` edits a ``TokenBatch``; as a callback it may track the
    run (hooks, ``state_dict``). The module finds it among the trainer's callbacks."""

    trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "token_policies"):
            raise TypeError(f"{type(self).__name__} works with a DistillationModule, not {type(pl_module).__name__}")
        self.trainer = trainer

    def global_values(self, values: Tensor) -> Tensor:
        """``values`` of every process, concatenated (the values themselves on one process)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return values
        strategy = self.trainer.strategy
        size = torch.tensor(len(values), device=values.device)
        sizes = strategy.all_gather(size).reshape(-1)
        padded = torch.full((int(sizes.max()),), torch.nan, device=values.device, dtype=values.dtype)
        padded[: len(values)] = values
        gathered = strategy.all_gather(padded).reshape(len(sizes), -1)
        return torch.cat([row[: int(count)] for row, count in zip(gathered, sizes)])

    def __call__(self, tokens: TokenBatch) -> None:
        raise NotImplementedError


def active_policies(own: list, trainer: L.Trainer | None) -> list[Callable[[TokenBatch], None]]:
    """The module's own policies, then the trainer's ``TokenPolicy`` callbacks, in order."""
    callbacks = trainer.callbacks if trainer is not None else []
    return [*own, *(callback for callback in callbacks if isinstance(callback, TokenPolicy) and callback not in own)]
