"""The run's steps and the distillation temperature τ at each of them (SPEC §3).

The module owns τ: it reads ``τ(step, total_steps)`` from one schedule object every
step; token policies then adjust a per-token copy of it (``tokens.TokenBatch``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L

from kd_lightning.losses.base import check_temperature

SCHEDULES = ("constant", "linear", "cosine")


def total_steps(trainer: L.Trainer) -> int:
    """The optimizer steps the trainer will take in this fit (``max_steps``, or the epochs'
    batches over gradient accumulation)."""
    return int(trainer.estimated_stepping_batches)


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


class TemperatureSchedule:
    """τ from ``start`` to ``end`` over the run: ``constant``, ``linear`` or ``cosine``
    (``scheduled_temperature``), with progress ``step / (total_steps − 1)``.

    Stateless: τ is a function of the global step, which a resumed run restores.
    """

    def __init__(self, kind: str = "constant", start: float = 1.0, end: float | None = None):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown temperature schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
        end = start if end is None else end
        check_temperature(start)
        check_temperature(end)
        self.kind, self.start, self.end = kind, float(start), float(end)

    def __call__(self, step: int, total_steps: int) -> float:
        return scheduled_temperature(self.kind, self.start, self.end, step / max(1, total_steps - 1))

    def hparams(self) -> dict:
        return {"temperature": self.start, "temperature_schedule": self.kind, "temperature_end": self.end}

    def __repr__(self) -> str:
        return f"TemperatureSchedule({self.kind!r}, {self.start}, {self.end})"


class StepFunction:
    """Any callable of the step as a schedule: ``τ = function(step)``, checked each step."""

    def __init__(self, function: Callable[[int], float]):
        self.function = function

    def __call__(self, step: int, total_steps: int) -> float:
        temperature = float(self.function(step))
        check_temperature(temperature)
        return temperature

    def hparams(self) -> dict:
        return {"temperature_schedule": repr(self.function)}


def as_schedule(temperature: float | TemperatureSchedule | Callable[[int], float]) -> TemperatureSchedule | StepFunction:
    """The schedule of what ``DistillationModule(temperature=…)`` takes: a number (constant
    τ), a ``TemperatureSchedule``, or any callable of the step."""
    if isinstance(temperature, TemperatureSchedule):
        return temperature
    if callable(temperature):
        return StepFunction(temperature)
    return TemperatureSchedule("constant", temperature)
