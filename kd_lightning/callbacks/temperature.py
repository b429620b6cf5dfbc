"""Temperature schedules (SPEC §3): constant, linear or cosine from τ to τ_end."""

from __future__ import annotations

import math

import lightning as L

from kd_lightning.losses.base import check_temperature

SCHEDULES = ("constant", "linear", "cosine")


def scheduled_temperature(schedule: str, start: float, end: float, progress: float) -> float:
    """τ at ``progress`` ∈ [0, 1] of training:

    constant: ``start``; linear: ``start + (end − start)·progress``;
    cosine: ``end + (start − end)·(1 + cos(π·progress))/2``.
    """
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


class TemperatureSchedule(L.Callback):
    """Sets the module's base temperature before every training step.

    Stateless: τ is a function of the global step, which a resumed run restores.
    """

    def __init__(self, schedule: str = "constant", start: float = 1.0, end: float | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown temperature schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        end = start if end is None else end
        check_temperature(start)
        check_temperature(end)
        self.schedule, self.start, self.end = schedule, float(start), float(end)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        progress = trainer.global_step / max(1, trainer.estimated_stepping_batches - 1)
        pl_module.temperature = scheduled_temperature(self.schedule, self.start, self.end, progress)
