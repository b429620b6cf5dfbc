"""The random number generators of every process, saved in checkpoints and restored on resume."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist


def random_states() -> dict[str, Any]:
    """This process's global generator states, as tensors and Python numbers (which
    ``torch.load(weights_only=True)`` reads back)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"]:
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RandomState(L.Callback):
    """Saves the global generators of torch (CPU and CUDA), numpy and Python of every
    process in each checkpoint, and restores them before the first training step of a
    resumed run, so that everything drawn from them afterwards (dropout, the student's
    sampled responses) is what the uninterrupted run drew.

    The states are gathered from all processes (each process draws its own samples);
    a run resumed on another number of processes restores the first process's state.
    """

    def __init__(self) -> None:
        self.to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = random_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every_rank: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every_rank, states)
            return {"per_process": every_rank}
        return {"per_process": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["per_process"]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.to_restore = states[rank] if rank < len(states) else states[0]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # not in load_state_dict: Lightning restores callbacks before it builds the data
        # iterators and runs the hooks that open a resumed run
        if self.to_restore is not None:
            set_random_states(self.to_restore)
            self.to_restore = None
