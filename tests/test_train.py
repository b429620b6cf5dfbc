"""The Hydra configs and the kd-train command line."""

import importlib.resources
import subprocess
import sys

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from kd_lightning import losses
from kd_lightning.precision import Float32MatmulsForBf16
from kd_lightning.train import fit

CONF = importlib.resources.files("kd_lightning.conf")
GROUP_OPTIONS = [
    (group.name, option.name.removesuffix(".yaml"))
    for group in sorted(CONF.iterdir(), key=lambda path: path.name)
    if group.is_dir() and not group.name.startswith("_")
    for option in sorted(group.iterdir(), key=lambda path: path.name)
    if option.name.endswith(".yaml")
]
TINY = ["model=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false"]


def compose_config(output_dir, *overrides):
    """The config `kd-train OVERRIDES hydra.run.dir=output_dir` would run with."""
    with initialize_config_module("kd_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={output_dir}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def save_run_config(cfg, run_dir):
    """``run_dir/.hydra/config.yaml`` as kd-train writes it (without the ``hydra`` node), for
    what reads a run back (kd-eval, kd-export, ``runs.load_run``)."""
    (run_dir / ".hydra").mkdir()
    OmegaConf.save({key: value for key, value in cfg.items() if key != "hydra"}, run_dir / ".hydra" / "config.yaml")


def kd_train(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "kd_lightning.train", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_every_group_has_options():
    groups = {group for group, _ in GROUP_OPTIONS}
    assert {"data", "model", "divergence", "selection", "trainer", "logger", "callbacks"} <= groups
    assert {option for group, option in GROUP_OPTIONS if group == "divergence"} == set(losses.available())


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_config_group_composes(group, option, tmp_path):
    cfg = compose_config(tmp_path, f"{group}={option}")
    assert cfg.module._target_ == "kd_lightning.DistillationModule"
    if group == "divergence":
        divergence = instantiate(cfg.divergence)
        assert divergence.name == option and isinstance(divergence, losses.Divergence)


def test_divergence_parameters_and_temperature_reach_the_module(tmp_path):
    cfg = compose_config(tmp_path, "divergence=jsd", "divergence.beta=0.3", "temperature=4")
    assert instantiate(cfg.divergence).beta == 0.3 and instantiate(cfg.module.temperature)(0, 10) == 4


def test_the_temperature_schedule_keys_reach_the_module(tmp_path):
    cfg = compose_config(tmp_path, "temperature=2", "temperature_schedule=cosine", "temperature_end=0.5")
    schedule = instantiate(cfg.module.temperature)
    assert (schedule(0, 11), schedule(5, 11), schedule(10, 11)) == pytest.approx((2.0, 1.25, 0.5))


def test_overriding_module_temperature_is_refused_naming_the_key(tmp_path):
    """τ has one place in the config: module.temperature=2 stops with the key to use."""
    with pytest.raises(ValueError, match="use temperature=<τ>"):
        fit(compose_config(tmp_path, *TINY, "module.temperature=2"))
    run = kd_train("module.temperature=2", "trainer.max_steps=2", "model=tiny", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert run.returncode != 0 and "module.temperature: τ has one place in the config, the top-level keys: use temperature=<τ>" in run.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, new_key",
    [
        ("selection.latf.min_ratio=0.2", "callbacks.latf.min_ratio"),
        ("policy.callback.max_new_tokens=8", "callbacks.student_responses.max_new_tokens"),
        ("policy.callback.temperature=0.7", "callbacks.student_responses.sampling_temperature"),
        ("callbacks.temperature_schedule.end=2", "temperature"),
    ],
)
def test_moved_keys_are_refused_naming_the_new_one(override, new_key):
    from kd_lightning.train import refuse_moved_keys

    with pytest.raises(ValueError, match=f"use {new_key}"):
        refuse_moved_keys(["model=tiny", override])


def test_every_callback_comes_from_the_callbacks_group(tmp_path):
    """Selection, policy and export are entries of one group, instantiated in order."""
    from lightning.pytorch.callbacks import Timer

    from kd_lightning.callbacks import InverseDifficultyTemperature, LossAdaptiveTokenFocusing, RandomState, StudentResponses
    from kd_lightning.export import ExportStudent
    from kd_lightning.train import instantiate_callbacks

    cfg = compose_config(tmp_path, "selection=adakd", "policy=on_policy", "callbacks.student_responses.sampling_temperature=0.7")
    assert [type(callback) for callback in instantiate_callbacks(cfg)][1:] == [
        Timer, RandomState, LossAdaptiveTokenFocusing, InverseDifficultyTemperature, StudentResponses
    ]
    assert instantiate_callbacks(cfg)[-1].sampling_temperature == 0.7
    exported = instantiate_callbacks(compose_config(tmp_path, "export.enabled=true"))
    assert isinstance(exported[-1], ExportStudent) and exported[-1].out_dir == tmp_path / "student"


def test_tiny_run_writes_a_checkpoint_without_teacher_and_resumes(tmp_path):
    trainer = fit(compose_config(tmp_path, *TINY, "divergence=csd", "temperature=2"))
    assert trainer.global_step == 2
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert not [key for key in checkpoint["state_dict"] if "teacher" in key]
    assert checkpoint["hyper_parameters"]["divergence"] == "csd" and checkpoint["hyper_parameters"]["temperature"] == 2
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    for metric in ("train/loss", "train/kd_loss", "train/ce_loss", "train/lr", "train/tokens_per_s", "val/loss"):
        assert metric in header

    metrics = pd.read_csv(tmp_path / "metrics.csv")
    stale = metrics.iloc[[-1]].assign(step=2)  # what a run killed after its last checkpoint logged
    pd.concat([metrics, stale]).to_csv(tmp_path / "metrics.csv", index=False)

    resumed = fit(compose_config(tmp_path, *TINY, "divergence=csd", "temperature=2", "trainer.max_steps=4", "ckpt_path=last"))
    assert resumed.global_step == 4
    steps = pd.read_csv(tmp_path / "metrics.csv")["step"].tolist()
    assert steps[: len(metrics)] == metrics["step"].tolist() and steps.count(2) == 1 and max(steps) == 3
    fit(compose_config(tmp_path, *TINY, "divergence=csd", "temperature=2", "trainer.max_steps=1"))  # afresh
    assert pd.read_csv(tmp_path / "metrics.csv")["step"].tolist() == [0]


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_that_emulates_it_runs_float32_matmuls(native, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("kd_lightning.train.cpu_has_bf16", lambda: native)
    modes = []

    def recorded_mode():
        modes.append(Float32MatmulsForBf16())
        return modes[-1]

    monkeypatch.setattr("kd_lightning.train.Float32MatmulsForBf16", recorded_mode)
    caplog.set_level("INFO")
    fit(compose_config(tmp_path, *TINY, "trainer.precision=bf16-mixed", "trainer.max_steps=1"))
    said = "trainer.precision=bf16-mixed on a CPU without native bfloat16" in caplog.text
    assert said != native and len(modes) == (not native)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["temperature=0"], InstantiationException, "temperature must be finite and > 0"),
        (["divergence=jsd", "divergence.beta=2"], InstantiationException, "beta must be a number with 0 < beta < 1"),
        (["divergence=csd", "divergence.weighting=xx"], InstantiationException, "valid weightings: ss, us, ts, mix"),
        (["+divergence.gamma=1"], InstantiationException, "no parameter gamma"),
        (["data.max_length=16"], ValueError, "longer than max_length=16"),
        (["data.path=/no/such.jsonl"], InstantiationException, "no data file"),
    ],
)
def test_bad_input_is_named(overrides, error, message, tmp_path):
    with pytest.raises(error, match=message):
        fit(compose_config(tmp_path, *TINY, *overrides))


def test_missing_model_file_is_named(tmp_path):
    pytest.importorskip("gguf")
    overrides = ["model=smollm2", "model.tokenizer.gguf_package=null", f"+model.tokenizer.name_or_path={tmp_path}"]
    with pytest.raises(InstantiationException, match="no GGUF file 'SmolLM2-135M-Instruct.Q4_1.gguf'"):
        fit(compose_config(tmp_path, *overrides))


def test_kd_train_command_line(tmp_path):
    """The issue's acceptance run, through the installed console script."""
    run = subprocess.run(
        ["kd-train", *TINY[:1], "divergence=rkl", "temperature=2", "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'OUT'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "OUT" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3 and not [key for key in checkpoint["state_dict"] if "teacher" in key]
    assert "checkpoint: " in run.stdout + run.stderr


def test_unknown_divergence_exits_non_zero_naming_the_choices(tmp_path):
    run = kd_train("model=tiny", "divergence=nope", cwd=tmp_path)
    assert run.returncode != 0
    for name in losses.available():
        assert name in run.stderr
    assert "divergence/nope" in run.stderr


def test_non_positive_temperature_exits_non_zero(tmp_path):
    run = kd_train("model=tiny", "temperature=-1", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert run.returncode != 0 and "temperature must be finite and > 0" in run.stderr


def test_multirun_gives_one_flat_directory_per_job(tmp_path):
    """A path value names a job's directory by its last component, never nests it."""
    run = kd_train(
        "-m", "model=tiny", "trainer.max_steps=1", "divergence=fkl,rkl", f"export.dir={tmp_path / 'exports' / 'student'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = sorted(path.name for path in (tmp_path / "sweep").iterdir() if path.is_dir())
    assert jobs == [
        f"{number}_divergence={name},export.dir=student,model=tiny,trainer.max_steps=1" for number, name in enumerate(["fkl", "rkl"])
    ]
    for job in jobs:
        assert (tmp_path / "sweep" / job / "checkpoints" / "last.ckpt").is_file()


def test_adakd_run_moves_the_ratio_after_warmup(tmp_path):
    """The issue's acceptance run, shortened: `selection=adakd` logs all four metrics and
    the ratio leaves 1 once the warm-up is over and the loss falls."""
    import csv

    steps = 60
    fit(compose_config(tmp_path, *TINY, "selection=adakd", f"trainer.max_steps={steps}", "trainer.val_check_interval=60"))
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    ratios = [float(row["selection/ratio"]) for row in rows if row.get("selection/ratio")]
    assert len(ratios) == steps and ratios[: int(0.05 * steps)] == [1.0] * int(0.05 * steps)
    assert min(ratios) < 1.0
    for metric in ("selection/ema_loss", "selection/kept_tokens", "temperature/mean"):
        assert any(row.get(metric) for row in rows)


def test_ddp_run_and_resume_from_the_command_line(tmp_path):
    """`trainer=ddp` spawns 2 CPU processes inside the job; its checkpoint resumes."""
    out = tmp_path / "OUT"
    first = kd_train("model=tiny", "trainer=ddp", "trainer.devices=2", "trainer.max_steps=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 and not [key for key in checkpoint["state_dict"] if "teacher" in key]
    resumed = kd_train(
        "model=tiny", "trainer=ddp", "trainer.devices=2", "trainer.max_steps=4", "ckpt_path=last", f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


@pytest.mark.slow
def test_fsdp_run_and_resume_from_the_command_line(tmp_path):
    """`trainer=fsdp`: FSDP2 over 2 CPU processes (gloo); the distributed checkpoint holds
    no teacher shard and resumes. Slow: in the default suite, test_export's
    test_export_of_an_fsdp_checkpoint_and_its_resume makes the same checks on the runs it exports."""
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "OUT"
    common = ("model=tiny", "trainer=fsdp", "trainer.devices=2", f"hydra.run.dir={out}")
    first = kd_train(*common, "trainer.max_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = out / "checkpoints" / "last.ckpt"
    keys = list(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    assert any(key.startswith("state_dict.student.") for key in keys) and not [key for key in keys if "teacher" in key]
    assert torch.load(checkpoint / "meta.pt", weights_only=False)["global_step"] == 2
    resumed = kd_train(*common, "trainer.max_steps=4", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    assert torch.load(checkpoint / "meta.pt", weights_only=False)["global_step"] == 4


@pytest.mark.parametrize("placement", ["replicated", "offloaded"])
def test_fsdp_teacher_placements(placement, tmp_path):
    out = tmp_path / "OUT"
    run = kd_train(
        "model=tiny", "trainer=fsdp", "trainer.max_steps=1", f"module.teacher_placement={placement}",
        f"hydra.run.dir={out}", cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt" / "meta.pt").is_file()


@pytest.mark.slow
def test_multirun_with_spawned_processes(tmp_path):
    """Slow (two jobs of two spawned processes). In the default suite,
    test_multirun_gives_one_flat_directory_per_job runs a multirun and
    test_ddp_run_and_resume_from_the_command_line spawns DDP processes from kd-train."""
    run = kd_train(
        "-m", "model=tiny", "trainer=ddp", "trainer.max_steps=1", "temperature=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list((tmp_path / "sweep").glob("*/checkpoints/last.ckpt"))) == 2


def test_wandb_logger_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config(tmp_path, *TINY, "logger=wandb", "divergence=rkl", "temperature=2", "experiment=adakd")
    assert cfg.logger.wandb.group == "adakd" and cfg.logger.wandb.name == "rkl-tau2"
    trainer = fit(cfg)
    trainer.loggers[0].experiment.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
