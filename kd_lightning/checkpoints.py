"""Checkpoints that survive interruptions, written atomically and periodically by time,
and hold the trained weights only (never the frozen teacher).

A checkpoint file is first written in full to ``NAME.partial`` next to its final path,
flushed to disk, then renamed over ``NAME`` (``os.replace``, atomic on POSIX file
systems): a process killed while saving, or a disk that fills up, leaves the previous
``last.ckpt`` whole. (FSDP's distributed checkpoints are directories written by
``torch.distributed.checkpoint``, not through this plugin; see the README.)
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from kd_lightning.safe_checkpoints import load_checkpoint


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves replace the old file only once the new one is
    complete, and whose loads (a resumed run) read weights and plain values only, unless
    ``trust_checkpoint`` (``kd_lightning.safe_checkpoints``)."""

    def __init__(self, trust_checkpoint: bool = False):
        super().__init__()
        self.trust_checkpoint = trust_checkpoint

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint(path, trust=self.trust_checkpoint, map_location=map_location or "cpu")

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        partial = path.with_name(path.name + ".partial")  # not *.ckpt: never taken for a checkpoint
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except (OSError, RuntimeError) as error:  # torch.save reports failed writes as RuntimeError
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            raise CheckpointWriteError(
                f"could not write the checkpoint {path} ({error}); the previous checkpoints in {path.parent} are "
                "intact. Free disk space or make the directory writable (or give another hydra.run.dir), then resume "
                "with ckpt_path=last"
            ) from error


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, and also ``last.ckpt`` every ``every_minutes`` of training.

    Lightning's own ``train_time_interval`` excludes saving at validations; this keeps
    them and adds a save of the last checkpoint after any training step that ends at
    least ``every_minutes`` after the previous save (``None``: no saves by time). The
    first process decides, so all processes save together.
    """

    def __init__(self, every_minutes: float | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"checkpoint.every_minutes must be > 0 (or null: no saves by time), got {every_minutes}")
        self.every = None if every_minutes is None else timedelta(minutes=every_minutes)
        self.saved_at = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.saved_at = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.every is None or self._should_skip_saving_checkpoint(trainer):
            return
        if trainer.strategy.broadcast(time.monotonic() - self.saved_at >= self.every.total_seconds()):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.saved_at = time.monotonic()


def frozen_student_keys(module: nn.Module) -> set[str]:
    """The state-dict keys (under ``student.``) of a LoRA student's frozen base weights."""
    if not module.lora or not hasattr(module, "student"):
        return set()
    return {f"student.{name}" for name, parameter in module.student.named_parameters() if not parameter.requires_grad}


def drop_teacher_weights(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """A state-dict hook: the frozen teacher, and a LoRA student's frozen base, are rebuilt
    from their sources, never saved with the trained weights."""
    frozen = {prefix + key for key in frozen_student_keys(module)}
    for key in [key for key in state_dict if key.startswith(prefix + "teacher.") or key in frozen]:
        del state_dict[key]


def ignore_missing_teacher(module: nn.Module, incompatible_keys) -> None:
    """A load-state-dict hook: loading a checkpoint leaves the live teacher (and a LoRA
    student's frozen base) as it is: their keys are not missing."""
    missing, frozen = incompatible_keys.missing_keys, frozen_student_keys(module)
    missing[:] = [key for key in missing if not (key.startswith("teacher.") or ".teacher." in key or key in frozen)]
