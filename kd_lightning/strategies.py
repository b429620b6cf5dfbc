"""FSDP2 for distillation: Lightning's ModelParallelStrategy with processes spawned in the job.

``ModelParallelStrategy`` re-executes the command line for its extra processes, which
Hydra multirun (and pytest) cannot survive; this strategy spawns them from inside the
job instead, as ``ddp_spawn`` does. The module shards teacher and student per decoder
layer in ``configure_model`` (see ``DistillationModule.configure_model``).
"""

from __future__ import annotations

import os
import shutil

from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from kd_lightning.safe_checkpoints import check_checkpoint


class _ShardedSpawnLauncher(_MultiProcessingLauncher):
    """Sends rank 0's metrics and trainer state back to the main process, not its weights:
    they are sharded, and the checkpoints hold them."""

    def _collect_rank_zero_results(self, trainer, results):
        output = super()._collect_rank_zero_results(trainer, results)
        if output is None or output.weights_path is None:
            return output
        shutil.rmtree(os.path.dirname(output.weights_path), ignore_errors=True)
        return output._replace(weights_path=None)


class SpawnedModelParallelStrategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over ``data_parallel_size`` spawned processes. A checkpoint
    it resumes from is first checked to hold weights and plain values only, unless
    ``trust_checkpoint`` (``kd_lightning.safe_checkpoints``)."""

    def __init__(self, *args, trust_checkpoint: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.trust_checkpoint = trust_checkpoint

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        check_checkpoint(checkpoint_path, self.trust_checkpoint)
        return super().load_checkpoint(checkpoint_path, weights_only=not self.trust_checkpoint)

    def _configure_launcher(self) -> None:
        """Spawn the processes, unless a cluster (SLURM, torchrun) has started them."""
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _ShardedSpawnLauncher(self, start_method="spawn")
