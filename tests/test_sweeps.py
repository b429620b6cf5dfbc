"""Sweeps beyond one job at a time: Optuna search, a local process pool, SLURM."""

from types import SimpleNamespace

import yaml

from kd_lightning.strategies import SpawnedModelParallelStrategy
from test_train import compose_config, kd_train

TINY = ("model=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false")


def test_hparams_search_runs_optuna_trials(tmp_path):
    """The issue's command: 2 steps, before the tiny model's first validation (step 10),
    so the objective comes from a validation pass at the end."""
    run = kd_train(
        "-m", "hparams_search=tau", "model=tiny", "trainer.max_steps=2", "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path / 'S'}", cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "S" / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"temperature", "divergence.beta", "module.optimizer.lr"}
    assert 0 < results["best_value"] < 20  # the validation cross-entropy
    assert len([path for path in (tmp_path / "S").iterdir() if path.is_dir()]) == 2


def test_a_missing_optimized_metric_is_named(tmp_path):
    run = kd_train(*TINY, "optimized_metric=val/nope", f"hydra.run.dir={tmp_path / 'R'}", cwd=tmp_path)
    assert run.returncode != 0 and "optimized_metric 'val/nope' was not logged; logged:" in run.stderr


def test_local_pool_runs_the_jobs_of_a_sweep(tmp_path):
    run = kd_train("-m", "hydra/launcher=local_pool", *TINY, "temperature=1,2", f"hydra.sweep.dir={tmp_path / 'S'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Joblib.Parallel" in run.stdout + run.stderr
    assert len(list((tmp_path / "S").glob("*/checkpoints/last.ckpt"))) == 2


def test_slurm_launcher_takes_its_shape_from_the_trainer(tmp_path):
    cfg = compose_config(tmp_path, "hydra/launcher=slurm", "trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


def test_fsdp_strategy_spawns_only_when_no_cluster_started_the_processes():
    strategy = SpawnedModelParallelStrategy()
    strategy.cluster_environment = SimpleNamespace(creates_processes_externally=True)
    strategy._configure_launcher()
    assert strategy._launcher is None
    strategy.cluster_environment = SimpleNamespace(creates_processes_externally=False)
    strategy._configure_launcher()
    assert strategy._launcher is not None
