"""Lightning callbacks: token selection and temperature policies (SPEC §3), student-generated responses,
random states for exact resumes, sample answers of teacher and student."""

from kd_lightning.callbacks.policy import StudentResponses
from kd_lightning.callbacks.random_state import RandomState
from kd_lightning.callbacks.samples import SampleAnswers
from kd_lightning.callbacks.selection import InverseDifficultyTemperature, LossAdaptiveTokenFocusing
from kd_lightning.tokens import TokenPolicy

__all__ = [
    "InverseDifficultyTemperature",
    "LossAdaptiveTokenFocusing",
    "RandomState",
    "SampleAnswers",
    "StudentResponses",
    "TokenPolicy",
]
