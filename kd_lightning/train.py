"""``kd-train``: compose the Hydra config, build the parts, fit, and say where results are.

    kd-train                                         # the default: SmolLM2-135M teacher on Dolly
    kd-train model=tiny divergence=rkl temperature=2
    kd-train -m divergence=fkl,rkl temperature=0.5,1,2,4   # a grid, one directory per job
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from kd_lightning.cli import compact_errors
from kd_lightning.export import ExportStudent
from kd_lightning.models import check_same_tokenizer

log = logging.getLogger(__name__)


def fit(cfg: DictConfig) -> L.Trainer:
    """Build tokenizer, data, module, callbacks, loggers and trainer from ``cfg``, then fit."""
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = instantiate(cfg.model.tokenizer)
    if cfg.model.get("teacher_tokenizer") is not None:
        check_same_tokenizer(tokenizer, instantiate(cfg.model.teacher_tokenizer))
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    module = instantiate(
        cfg.module,
        student=instantiate(cfg.model.student),
        teacher=instantiate(cfg.model.teacher),
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
