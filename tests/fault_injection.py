"""Callbacks that SIGKILL the training process at chosen points (used by test_faults.py).

Loaded into a ``kd-train`` subprocess with ``PYTHONPATH=tests`` and
``+callbacks.kill._target_=fault_injection.KillAtStep``: the process dies as a
preempted job does, with no exception handler, ``finally`` block or Lightning teardown.
"""

import os
import signal

import lightning as L


def kill_this_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(L.Callback):
    """SIGKILL before training step ``step`` + 1, after everything of step ``step``
    (its validation and checkpoint included)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            kill_this_process()


class KillWhileSaving(L.Callback):
    """SIGKILL in the middle of writing the ``nth`` checkpoint file of step ``step`` (the
    top-k file, then last.ckpt): the file is open when its contents are serialised."""

    def __init__(self, step: int, nth: int = 1):
        self.step, self.nth = step, nth

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == self.step:
            self.nth -= 1
            if self.nth == 0:
                checkpoint["kill"] = KilledWhenPickled()


class KilledWhenPickled:
    def __reduce__(self):
        kill_this_process()
