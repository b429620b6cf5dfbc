"""``kd-train``: compose the Hydra config, build the parts, fit, and say where results are.

    kd-train                                         # the default: SmolLM2-135M teacher on Dolly
    kd-train model=tiny divergence=rkl temperature=2
    kd-train -m divergence=fkl,rkl temperature=0.5,1,2,4   # a grid, one directory per job
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd_lightning.cache import CachedTeacher, run_fingerprint
from kd_lightning.cli import compact_errors
from kd_lightning.export import ExportStudent
from kd_lightning.models import check_same_tokenizer
from kd_lightning.module import wants_teacher

log = logging.getLogger(__name__)


def fit(cfg: DictConfig) -> L.Trainer:
    """Build tokenizer, data, module, callbacks, loggers and trainer from ``cfg``, then fit."""
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = instantiate(cfg.model.tokenizer)
    # the models' own tokenizers, where they ship one, must equal the run's
    if (teacher_tokenizer := instantiate(cfg.model.get("teacher_tokenizer"))) is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    if (student_tokenizer := instantiate(cfg.model.get("student_tokenizer"))) is not None:
        check_same_tokenizer(student_tokenizer, tokenizer)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    student, teacher = instantiate(cfg.model.student), instantiate(cfg.model.teacher)
    if cfg.teacher_cache:
        check_cacheable(cfg)
        if wants_teacher(student) and not cfg.model.student.get("name_or_path"):
            # a copy of teacher layers: built from the live teacher, which is freed before training
            student = partial(student_from_teacher, student, teacher)
        teacher = partial(CachedTeacher, cfg.teacher_cache, run_fingerprint(cfg, tokenizer, datamodule))
    module = instantiate(
        cfg.module,
        student=student,
        teacher=teacher,
        divergence=instantiate(cfg.divergence),
        vocab_size=len(tokenizer),
    )
    callbacks = [instantiate(callback) for callback in (*cfg.callbacks.values(), *cfg.selection.values())]
    if cfg.policy.callback is not None:
        callbacks.append(instantiate(cfg.policy.callback))
    if cfg.export.enabled:
        callbacks.append(ExportStudent(cfg.export.dir, cfg))
    loggers = [instantiate(logger) for logger in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:  # with spawned processes only the directory is known here
        last = Path(checkpoint.last_model_path or Path(checkpoint.dirpath) / "last.ckpt")
        log.info("checkpoint: %s", last if last.exists() else "none (no training step)")
    for logger in trainer.loggers:
        log.info("metrics: %s", logger.log_dir or logger.save_dir)
    return trainer


def check_cacheable(cfg: DictConfig) -> None:
    if cfg.policy.callback is not None:
        raise ValueError(
            f"policy={cfg.policy.name} trains on responses the student generates, which the teacher must score "
            "live; a teacher cache holds the data set's responses only: drop teacher_cache or use policy=offline"
        )


def student_from_teacher(student_factory, teacher_factory):
    """The student ``student_factory`` builds from a live teacher, loaded for this alone."""
    return student_factory(teacher=teacher_factory())


def optimized_metric(trainer: L.Trainer, name: str) -> float:
    """The final value of the logged metric ``name``, for a Hydra sweeper; a validation
    metric that training did not reach (no validation step in a short run) comes from
    one validation pass over the trained student."""
    if name not in trainer.callback_metrics and name.startswith("val/"):
        trainer.validate(trainer.lightning_module, datamodule=trainer.datamodule, verbose=False)
    if name not in trainer.callback_metrics:
        raise KeyError(f"optimized_metric {name!r} was not logged; logged: {', '.join(sorted(trainer.callback_metrics))}")
    return float(trainer.callback_metrics[name])


@hydra.main(version_base="1.3", config_path="pkg://kd_lightning.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with compact_errors("kd-train"):
        trainer = fit(cfg)
        return optimized_metric(trainer, cfg.optimized_metric) if cfg.optimized_metric else None


if __name__ == "__main__":
    main()
