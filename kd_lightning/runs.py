"""A finished ``kd-train`` run: its config, its checkpoints and the models in them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import PreTrainedTokenizerBase

from kd_lightning.models import add_lora, build_student, frozen
from kd_lightning.safe_checkpoints import check_checkpoint, load_checkpoint

ROLES = ("student", "teacher", "student-init")
#: the config groups kd-eval and kd-export read
RUN_GROUPS = ("model", "data", "divergence", "callbacks", "policy", "module", "trainer")
#: the callbacks entries of the selection group (older run configs list them under a selection key)
TOKEN_POLICY_ENTRIES = ("latf", "idts")


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
            "(e.g. policy: {name: offline, lambda: 0.0} for a run trained on the dataset's responses)"
        )
    return cfg


def checkpoint_state(checkpoint: Path, trust: bool = False) -> dict:
    """The module state dict of a checkpoint: a single file, or the directory of a
    distributed (FSDP) checkpoint, whose shards are gathered into one state dict. Read
    restricted to weights and plain values unless ``trust`` (``safe_checkpoints``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    check_checkpoint(checkpoint, trust)  # before torch.distributed.checkpoint unpickles its index
    if checkpoint.is_dir():
        with tempfile.TemporaryDirectory() as scratch:
            dcp_to_torch_save(checkpoint, Path(scratch) / "checkpoint.pt")
            return load_checkpoint(Path(scratch) / "checkpoint.pt", trust)["state_dict"]
    return load_checkpoint(checkpoint, trust)["state_dict"]


def describe_run(cfg: DictConfig) -> dict:
    """What a run trained with, as kd-eval's result rows and kd-export's model card name it:
    its divergence (and parameters), τ and its schedule, token selection, data source
    policy, cross-entropy weight and seed."""
    token_policies = cfg.selection if "selection" in cfg else [name for name in cfg.callbacks if name in TOKEN_POLICY_ENTRIES]
    return {
        "divergence": cfg.divergence.name,
        "divergence_params": {key: value for key, value in cfg.divergence.items() if key not in ("_target_", "name")},
        "temperature": cfg.temperature,
        "temperature_schedule": cfg.temperature_schedule,
        "selection": "+".join(token_policies) or "none",
        "policy": f"{cfg.policy.name} (λ = {cfg.policy['lambda']})",
        "ce_weight": cfg.module.ce_weight,
        "seed": cfg.seed,
    }


def load_run(path: Path, role: str = "student", trust_checkpoint: bool = False) -> tuple:
    """The tokenizer, the model of ``role`` and the config of a run, from its directory
    (its ``checkpoints/last.ckpt``) or one of its checkpoints. ``student-init`` is the
    student as the run built it, before training; the teacher is rebuilt from its source.
    Only that role is built (and the teacher's weights only for a student copied from them).
    The checkpoint is read restricted to weights and plain values unless ``trust_checkpoint``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    path = Path(path)
    cfg = run_config(path)
    teacher_factory = instantiate(cfg.model.teacher)

    def teacher() -> nn.Module:
        return frozen(teacher_factory())

    if role == "teacher":
        return run_tokenizer(cfg, role), teacher(), cfg
    student = build_student(instantiate(cfg.model.student), teacher)
    lora = cfg.module.get("lora")
    if lora is not None and lora.r > 0:
        student = add_lora(student, **lora)
    if role == "student":
        checkpoint = path if path != run_directory(path) else path / "checkpoints" / "last.ckpt"
        load_trained_weights(student, checkpoint_state(checkpoint, trust_checkpoint))
    return run_tokenizer(cfg, role), student, cfg


def run_tokenizer(cfg: DictConfig, role: str) -> PreTrainedTokenizerBase:
    """The tokenizer the ``role`` model of a run reads: the data's (``model.tokenizer``), or
    in a run across tokenizers (``cross_tokenizer`` other than ``none``) that model's own
    (``model.teacher_tokenizer`` or ``model.student_tokenizer``) where it ships one: what
    kd-train trains with and kd-eval and kd-export read a run back with."""
    if cfg.get("cross_tokenizer", {}).get("name", "none") != "none":
        own = instantiate(cfg.model.get("teacher_tokenizer" if role == "teacher" else "student_tokenizer"))
        if own is not None:
            return own
    return instantiate(cfg.model.tokenizer)


def load_trained_weights(student: nn.Module, state_dict: dict) -> None:
    """The student's weights from a module state dict (keys ``student.…``): all of them,
    or a LoRA student's adapters, whose frozen base is the one just built."""
    weights = {key.removeprefix("student."): value for key, value in state_dict.items() if key.startswith("student.")}
    frozen_base = {name for name, parameter in student.named_parameters() if not parameter.requires_grad}
    result = student.load_state_dict(weights, strict=False)
    missing = [key for key in result.missing_keys if key not in frozen_base]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the checkpoint does not fit the run's student: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
