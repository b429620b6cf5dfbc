"""``kd-train``: compose the Hydra config, build the parts, fit, and say where results are.

    kd-train                                         # the default: SmolLM2-135M teacher on Dolly
    kd-train model=tiny divergence=rkl temperature=2
    kd-train -m divergence=fkl,rkl temperature=0.5,1,2,4   # a grid, one directory per job
"""

from __future__ import annotations

import contextlib
import logging
import sys
from functools import partial
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Timer
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from kd_lightning.cache import open_cache, read_fingerprint
from kd_lightning.cache_build import run_fingerprint
from kd_lightning.cli import compact_errors
from kd_lightning.cross_tokenizer import CrossTokenizer, check_cross_tokenizer_cache, tokenizer_match
from kd_lightning.data.cross_tokenizer import CrossTokenizerDataModule
from kd_lightning.models import build_student, check_same_tokenizer, copies_teacher
from kd_lightning.precision import Float32MatmulsForBf16, cpu_has_bf16
from kd_lightning.runs import run_tokenizer

log = logging.getLogger(__name__)


def fit(cfg: DictConfig) -> L.Trainer:
    """Build tokenizer, data, module, callbacks, loggers and trainer from ``cfg``, then fit."""
    check_temperature_keys(cfg)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer, datamodule, cross_tokenizer = tokenizers_and_data(cfg)
    student, teacher = instantiate(cfg.model.student), instantiate(cfg.model.teacher)
    if cfg.teacher_cache:
        check_cacheable(cfg, cross_tokenizer)
        if copies_teacher(student):  # built from the live teacher, which is freed before training
            student = partial(build_student, student, teacher)
        teacher = partial(open_cache, cfg.teacher_cache, run_fingerprint(cfg, tokenizer, datamodule))
    module = instantiate(
        cfg.module,
        student=student,
        teacher=teacher,
        divergence=instantiate(cfg.divergence),
        vocab_size=len(tokenizer),
        cross_tokenizer=cross_tokenizer,
    )
    callbacks = instantiate_callbacks(cfg)
    loggers = [instantiate(logger) for logger in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    with bf16_matmuls(cfg, trainer):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:  # with spawned processes only the directory is known here
        last = Path(checkpoint.last_model_path or Path(checkpoint.dirpath) / "last.ckpt")
        log.info("checkpoint: %s", last if last.exists() else "none (no training step)")
    for logger in trainer.loggers:
        log.info("metrics: %s", logger.log_dir or logger.save_dir)
    for timer in (callback for callback in trainer.callbacks if isinstance(callback, Timer)):
        log.info("training time: %.0f s (a resumed run's earlier parts included)", timer.time_elapsed("train"))
    return trainer


#: what refusing two different tokenizers adds: how to distil across them
CROSS_TOKENIZER_HINT = "; or distil across tokenizers with cross_tokenizer=uld|gold|hybrid"


def tokenizers_and_data(cfg: DictConfig) -> tuple[PreTrainedTokenizerBase, L.LightningDataModule, CrossTokenizer | None]:
    """The data's tokenizer, the data module and the cross-tokenizer settings (``None`` for
    ``cross_tokenizer=none``, where the models' own tokenizers, where they ship one, must
    equal the data's). With ``cross_tokenizer=uld|gold|hybrid`` the student's tokenizer
    tokenises the data, the teacher's its own side (``CrossTokenizerDataModule``), and each
    defaults to the data's tokenizer (``model.tokenizer``) where its model ships none
    (``runs.run_tokenizer``, which kd-eval and kd-export read a run back with)."""
    settings = OmegaConf.to_container(cfg.cross_tokenizer, resolve=True)
    name = settings.pop("name")
    if name != "none":
        teacher_tokenizer, student_tokenizer = run_tokenizer(cfg, "teacher"), run_tokenizer(cfg, "student")
        cross_tokenizer = CrossTokenizer(name, tokenizer_match(teacher_tokenizer, student_tokenizer), settings)
        datamodule = instantiate(
            cfg.data, _target_=CrossTokenizerDataModule, tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer
        )
        return student_tokenizer, datamodule, cross_tokenizer
    tokenizer = instantiate(cfg.model.tokenizer)
    teacher_tokenizer = instantiate(cfg.model.get("teacher_tokenizer"))
    student_tokenizer = instantiate(cfg.model.get("student_tokenizer"))
    try:
        if teacher_tokenizer is not None:
            check_same_tokenizer(tokenizer, teacher_tokenizer)
        if student_tokenizer is not None:
            check_same_tokenizer(student_tokenizer, tokenizer)
    except ValueError as error:
        raise ValueError(f"{error}{CROSS_TOKENIZER_HINT}") from None
    return tokenizer, instantiate(cfg.data, tokenizer=tokenizer), None


def bf16_matmuls(cfg: DictConfig, trainer: L.Trainer) -> contextlib.AbstractContextManager:
    """:class:`Float32MatmulsForBf16` while bf16 is asked of a CPU that only emulates it,
    where torch's own bf16 matmuls run an order of magnitude slower than float32's."""
    asked = [f"trainer.precision={trainer.precision}"] if str(trainer.precision).startswith("bf16") else []
    asked += [f"model.{role}.dtype=bfloat16" for role in ("teacher", "student") if cfg.model[role].get("dtype") == "bfloat16"]
    if asked and isinstance(trainer.accelerator, CPUAccelerator) and not cpu_has_bf16():
        log.info(
            "%s on a CPU without native bfloat16 (no AVX512-BF16 or AMX): bf16 matmuls run as float32 "
            "matmuls of the bf16 operands, the same numbers up to summation order at float32 speed.", ", ".join(asked),
        )
        return Float32MatmulsForBf16()
    return contextlib.nullcontext()


def instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Every entry of the ``callbacks`` group, in order. An entry that is null or has
    ``enabled: false`` is off; a partial (``_partial_: true``) is called with the run's config."""
    callbacks = []
    for entry in cfg.callbacks.values():
        settings = {} if entry is None else OmegaConf.to_container(entry, resolve=True)
        if settings and settings.pop("enabled", True):
            callback = instantiate(settings)
            callbacks.append(callback(run_config=cfg) if isinstance(callback, partial) else callback)
    return callbacks


#: keys that τ once had besides the top-level ones, which module.temperature is now wired to
OLD_TEMPERATURE_KEYS = ("module.temperature", "callbacks.temperature_schedule")


def temperature_keys_message(key: str) -> str:
    return (
        f"{key}: τ has one place in the config, the top-level keys: use temperature=<τ> "
        "(and temperature_schedule, temperature_end for a schedule)"
    )


def check_temperature_keys(cfg: DictConfig) -> None:
    """Raise ``ValueError`` unless ``module.temperature`` is the schedule of the top-level τ keys."""
    schedule = cfg.module.temperature
    wired = OmegaConf.is_dict(schedule) and (schedule.get("kind"), schedule.get("start"), schedule.get("end")) == (
        cfg.temperature_schedule, cfg.temperature, cfg.temperature_end
    )
    if not wired:
        raise ValueError(temperature_keys_message("module.temperature"))


def check_cacheable(cfg: DictConfig, cross_tokenizer: CrossTokenizer | None) -> None:
    """Refuses a teacher cache to a run it cannot serve: on-policy, or a cross-tokenizer
    objective from a top-k cache."""
    if cross_tokenizer is not None:
        check_cross_tokenizer_cache(read_fingerprint(Path(cfg.teacher_cache)).get("format", "exact"), cross_tokenizer.name)
    if "student_responses" in cfg.callbacks:
        raise ValueError(
            f"policy={cfg.policy.name} trains on responses the student generates, which the teacher must score "
            "live; a teacher cache holds the data set's responses only: drop teacher_cache or use policy=offline"
        )


def optimized_metric(trainer: L.Trainer, name: str) -> float:
    """The final value of the logged metric ``name``, for a Hydra sweeper; a validation
    metric that training did not reach (no validation step in a short run) comes from
    one validation pass over the trained student."""
    if name not in trainer.callback_metrics and name.startswith("val/"):
        trainer.validate(trainer.lightning_module, datamodule=trainer.datamodule, verbose=False)
    if name not in trainer.callback_metrics:
        raise KeyError(f"optimized_metric {name!r} was not logged; logged: {', '.join(sorted(trainer.callback_metrics))}")
    return float(trainer.callback_metrics[name])


#: config keys that moved, and where: an override of an old key is refused, naming the new one
MOVED_KEYS = {
    "selection.latf": "callbacks.latf",
    "selection.idts": "callbacks.idts",
    "policy.callback.temperature": "callbacks.student_responses.sampling_temperature",
    "policy.callback": "callbacks.student_responses",
}


def refuse_moved_keys(overrides: list[str]) -> None:
    """Raise ``ValueError`` for the first command-line override of a key that moved (naming
    the new key) or of τ inside the module (naming the top-level keys)."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if any(key == old or key.startswith(old + ".") for old in OLD_TEMPERATURE_KEYS):
            raise ValueError(temperature_keys_message(key))
        for old, new in MOVED_KEYS.items():
            if key == old or key.startswith(old + "."):
                raise ValueError(f"{key} has moved: use {new}{key[len(old):]}")


@hydra.main(version_base="1.3", config_path="pkg://kd_lightning.conf", config_name="train")
def run(cfg: DictConfig) -> float | None:
    with compact_errors("kd-train"):
        trainer = fit(cfg)
        return optimized_metric(trainer, cfg.optimized_metric) if cfg.optimized_metric else None


def main() -> float | None:
    try:
        refuse_moved_keys(sys.argv[1:])
    except ValueError as error:
        sys.exit(f"kd-train: error: {error}")
    return run()


if __name__ == "__main__":
    main()
