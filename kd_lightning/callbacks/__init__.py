"""Lightning callbacks: token selection and temperature policies (SPEC §3), student-generated responses,
random states for exact resumes."""

from kd_lightning.callbacks.policy import StudentResponses
from kd_lightning.callbacks.random_state import RandomState
from kd_lightning.callbacks.selection import InverseDifficultyTemperature, LossAdaptiveTokenFocusing, TokenPolicy
from kd_lightning.callbacks.temperature import SCHEDULES, TemperatureSchedule, scheduled_temperature

__all__ = [
    "SCHEDULES",
    "InverseDifficultyTemperature",
    "LossAdaptiveTokenFocusing",
    "RandomState",
    "StudentResponses",
    "TemperatureSchedule",
    "TokenPolicy",
    "scheduled_temperature",
]
