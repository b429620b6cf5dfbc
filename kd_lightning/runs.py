"""A finished ``kd-train`` run: its config, its checkpoints and the models in them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from kd_lightning.module import DistillationModule

ROLES = ("student", "teacher", "student-init")
#: the config groups kd-eval and kd-export read
RUN_GROUPS = ("model", "data", "divergence", "selection", "policy", "module", "trainer")


def run_directory(path: Path) -> Path:
    """The run directory of ``path``: the directory itself, or the run a checkpoint
    (``RUN/checkpoints/NAME``: a file, or an FSDP checkpoint directory ``NAME.ckpt``) belongs to."""
    path = Path(path)
    return path.parent.parent if path.is_file() or path.suffix == ".ckpt" else path


def run_config(path: Path) -> DictConfig:
    """The run's ``.hydra/config.yaml``, checked to hold every config group of this version."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist: give a kd-train run directory or a checkpoint inside one")
    config_file = run_directory(path) / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"no run configuration at {config_file}: give a kd-train run directory or its checkpoint")
    cfg = OmegaConf.load(config_file)
    missing = [group for group in RUN_GROUPS if group not in cfg]
    if missing:
        raise ValueError(
            f"{config_file} has no {', '.join(missing)} config group{'s' if len(missing) > 1 else ''}: the run was "
            "written by an older kd_lightning. Add the group to that file as `kd-train --cfg job` prints it "
            "(e.g. policy: {name: offline, lambda: 0.0, callback: null} for a run trained on the dataset's responses)"
        )
    return cfg


def checkpoint_state(checkpoint: Path) -> dict:
    """The module state dict of a checkpoint: a single file, or the directory of a
    distributed (FSDP) checkpoint, whose shards are gathered into one state dict."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    if checkpoint.is_dir():
        with tempfile.TemporaryDirectory() as scratch:
            dcp_to_torch_save(checkpoint, Path(scratch) / "checkpoint.pt")
            return torch.load(Path(scratch) / "checkpoint.pt", map_location="cpu", weights_only=False)["state_dict"]
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def load_run(path: Path, role: str = "student") -> tuple:
    """The tokenizer, the model of ``role`` and the config of a run, from its directory
    (its ``checkpoints/last.ckpt``) or one of its checkpoints. ``student-init`` is the
    student as the run built it, before training; the teacher is rebuilt from its source."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    path = Path(path)
    cfg = run_config(path)
    module = DistillationModule(
        student=instantiate(cfg.model.student), teacher=instantiate(cfg.model.teacher), lora=cfg.module.get("lora")
    )
    module.configure_model()
    if role == "student":
        checkpoint = path if path != run_directory(path) else path / "checkpoints" / "last.ckpt"
        module.load_state_dict(checkpoint_state(checkpoint))
    model: nn.Module = module.teacher if role == "teacher" else module.student
    return instantiate(cfg.model.tokenizer), model, cfg
