"""Lightning's warning about modules in eval mode, without the frozen teacher's.

When training starts Lightning warns of every submodule in eval mode ("Found N module(s)
in eval mode at the start of training"). The teacher is in eval mode on purpose (frozen,
no dropout), so a warning that counts only its modules says nothing; one that counts a
student module too still shows.
"""

from __future__ import annotations

import re
import warnings

from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn


def eval_mode_modules(module: nn.Module) -> tuple[int, int]:
    """The number of ``module``'s submodules in eval mode: inside its ``teacher``, and in all."""
    in_eval = [name for name, submodule in module.named_modules() if not submodule.training]
    in_teacher = [name for name in in_eval if name == "teacher" or name.startswith("teacher.")]
    return len(in_teacher), len(in_eval)


def hide_frozen_teacher_warning(module: nn.Module) -> tuple | None:
    """Hide Lightning's eval-mode warning if the teacher's modules are the only ones it
    would count; returns the warnings filter to remove once the check is done
    (:func:`remove_warning_filter`), or ``None`` if nothing is hidden."""
    in_teacher, in_all = eval_mode_modules(module)
    if in_teacher == 0 or in_teacher != in_all:
        return None
    # the message with this exact count: a student module in eval mode changes it
    message = re.escape(f"Found {in_teacher} module(s) in eval mode at the start of training.")
    warnings.filterwarnings("ignore", message=message, category=PossibleUserWarning)
    return warnings.filters[0]


def remove_warning_filter(entry: tuple | None) -> None:
    """Remove a filter added by :func:`hide_frozen_teacher_warning` (if still there)."""
    if entry in warnings.filters:
        warnings.filters.remove(entry)
