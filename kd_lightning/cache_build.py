"""``kd-cache``: run the teacher once over a run's examples and store its outputs.

    kd-cache <kd-train overrides> teacher_cache=DIR                                # exact: hidden states
    kd-cache <kd-train overrides> teacher_cache=DIR cache.format=topk cache.top_k=32  # top-k log-probabilities
    kd-cache model=hf … cross_tokenizer=hybrid teacher_cache=DIR   # the teacher on its own tokens (exact only)

The fingerprint says what the stored outputs depend on (teacher, its files, tokenizer,
data, max_length, template) and how they are stored (dtype, format, K); ``kd-train
teacher_cache=DIR`` reads either format and refuses a cache built for another config.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from kd_lightning.cache import TeacherCacheWriter, file_sha256, text_sha256
from kd_lightning.constants import PLAIN_TEMPLATE, PLAIN_TEMPLATE_WITH_INPUT
from kd_lightning.cross_tokenizer import check_cross_tokenizer_cache
from kd_lightning.data.cross_tokenizer import teacher_side
from kd_lightning.locking import directory_lock
from kd_lightning.models import frozen
from kd_lightning.precision import cpu_bf16_matmuls
from kd_lightning.topk_cache import TopKCacheWriter

log = logging.getLogger(__name__)
FORMATS = ("exact", "topk")


def teacher_files(teacher_config: dict) -> dict[str, str]:
    """sha256 of the files the teacher loads from (a GGUF file, or a model directory's
    weights); empty for a teacher built from its config alone (``model=tiny``)."""
    from kd_lightning.models import resolve_model_path

    source = {key: teacher_config.get(key) for key in ("name_or_path", "gguf_file", "gguf_package")}
    if not any(source.values()):
        return {}
    directory = Path(resolve_model_path(**source))
    if source["gguf_file"]:
        files = [directory / source["gguf_file"]]
    else:
        files = sorted(path for pattern in ("*.safetensors", "*.bin", "*.gguf") for path in directory.glob(pattern))
    return {path.name: file_sha256(path) for path in files}


def run_fingerprint(cfg, tokenizer, datamodule) -> dict:
    """What a run's teacher outputs depend on, from its config (``cache.FINGERPRINT_FIELDS``),
    and how ``kd-cache`` stores them: ``dtype``, and for the top-k format ``format`` and ``top_k``.
    ``tokenizer`` and its template are the ones the teacher reads: with ``cross_tokenizer``,
    the data module's ``teacher_tokenizer``."""
    from omegaconf import OmegaConf

    tokenizer = getattr(datamodule, "teacher_tokenizer", tokenizer)
    teacher = OmegaConf.to_container(cfg.model.teacher, resolve=True)
    if datamodule.path is None:
        data = {"dataset": datamodule.dataset._fingerprint}
    elif datamodule.path.is_dir():  # a save_to_disk directory or a hub snapshot: every file in it
        files = sorted(path for path in datamodule.path.rglob("*") if path.is_file())
        data = {"directory": datamodule.path.name, "split": datamodule.split,
                "sha256": {str(path.relative_to(datamodule.path)): file_sha256(path) for path in files}}
    else:
        data = {"file": datamodule.path.name, "sha256": file_sha256(datamodule.path)}
    if datamodule.columns:
        data["columns"] = datamodule.columns
    return {
        "teacher": teacher,
        "teacher_files": teacher_files(teacher),
        "tokenizer": text_sha256(tokenizer.backend_tokenizer.to_str()),
        "data": data,
        "max_length": datamodule.max_length,
        "template": text_sha256(tokenizer.chat_template or PLAIN_TEMPLATE + PLAIN_TEMPLATE_WITH_INPUT),
        **storage(cfg),
    }


def storage(cfg) -> dict:
    """How the outputs are stored: the exact cache's ``dtype`` (``teacher_cache_dtype``), or
    the top-k cache's format, K and log-probability dtype (``cache.*``)."""
    if cfg.cache.format == "exact":
        return {"dtype": cfg.teacher_cache_dtype}
    if cfg.cache.format == "topk":
        return {"dtype": cfg.cache.topk_dtype, "format": "topk", "top_k": cfg.cache.top_k}
    raise ValueError(f"cache.format must be one of {', '.join(FORMATS)}, got {cfg.cache.format!r}")


def cache_writer(cfg, fingerprint: dict, vocab_size: int) -> TeacherCacheWriter:
    """The writer of the run's ``cache.format``."""
    if cfg.cache.format == "topk":
        return TopKCacheWriter(cfg.teacher_cache, fingerprint, vocab_size)
    return TeacherCacheWriter(cfg.teacher_cache, fingerprint)


def build(cfg) -> Path:
    """``kd-cache``: run the teacher of ``cfg`` over its training and validation examples
    and write the cache to ``cfg.teacher_cache`` (resuming an interrupted build)."""
    from hydra.utils import instantiate

    if not cfg.teacher_cache:
        raise ValueError("give the directory to write: kd-cache teacher_cache=DIR (and the same overrides as kd-train)")
    from kd_lightning.train import tokenizers_and_data  # kd-train's data, as kd-train builds it

    tokenizer, datamodule, cross_tokenizer = tokenizers_and_data(cfg)
    collate = datamodule.collate
    if cross_tokenizer is not None:  # the teacher's own tokens, as a one-tokenizer batch
        check_cross_tokenizer_cache(cfg.cache.format, cross_tokenizer.name)
        tokenizer, collate = datamodule.teacher_tokenizer, lambda examples: teacher_side(datamodule.collate(examples))
    datamodule.setup()
    fingerprint = run_fingerprint(cfg, tokenizer, datamodule)
    Path(cfg.teacher_cache).mkdir(parents=True, exist_ok=True)
    with directory_lock(cfg.teacher_cache, command="kd-cache " + " ".join(sys.argv[1:])):  # one builder at a time
        writer = cache_writer(cfg, fingerprint, len(tokenizer))
        accelerator = str(cfg.trainer.get("accelerator", "cpu"))
        device = torch.device("cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")
        teacher = frozen(instantiate(cfg.model.teacher)()).to(device)
        started = time.perf_counter()
        with cpu_bf16_matmuls(device.type):  # a bf16 teacher on a CPU without native bf16
            manifest = writer.write(
                teacher, {"train": datamodule.train_set, "validation": datamodule.val_set}, collate,
                cfg.data.batch_size, device,
            )
    size = sum((writer.directory / "shards" / shard["file"]).stat().st_size for shard in manifest["shards"])
    examples = sum(shard["examples"] for shard in manifest["shards"])
    log.info(
        "teacher cache %s (%s): %d examples, %.1f MiB, in %.0f s",
        writer.directory, cfg.cache.format, examples, size / 2**20, time.perf_counter() - started,
    )
    return writer.directory


def main() -> None:
    """``kd-cache``: the Hydra config and overrides of ``kd-train``; errors without traceback."""
    import hydra

    from kd_lightning.cli import compact_errors

    def cache_teacher(cfg) -> None:
        with compact_errors("kd-cache"):
            build(cfg)

    hydra.main(version_base="1.3", config_path="pkg://kd_lightning.conf", config_name="train")(cache_teacher)()


if __name__ == "__main__":
    main()
