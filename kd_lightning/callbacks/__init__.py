"""Lightning callbacks: token selection and temperature policies (SPEC §3), student-generated responses."""

from kd_lightning.callbacks.policy import StudentResponses
from kd_lightning.callbacks.selection import InverseDifficultyTemperature, LossAdaptiveTokenFocusing, TokenPolicy
from kd_lightning.callbacks.temperature import SCHEDULES, TemperatureSchedule, scheduled_temperature

__all__ = [
    "SCHEDULES",
    "InverseDifficultyTemperature",
    "LossAdaptiveTokenFocusing",
    "StudentResponses",
    "TemperatureSchedule",
    "TokenPolicy",
    "scheduled_temperature",
]
