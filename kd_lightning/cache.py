"""The teacher cache: the teacher's final hidden states, computed once per data set.

A sweep trains many students on the same examples; the teacher's part of every step is
the same each time. ``kd-cache`` runs the teacher once over the training and validation
examples and stores, for every counted position (a position whose next token is a
response token), its final hidden state ``h`` — the input of the lm_head — together
with the lm_head weight ``W``. Training then recomputes the teacher's logits as
``t = h Wᵀ`` inside the loss, exactly as the live teacher does, so every divergence,
temperature (per token too) and token policy sees the same logits.

Layout of a cache directory::

    fingerprint.json                what the states depend on (checked by kd-train)
    lm_head.safetensors             the teacher's lm_head weight [V, H] (and bias)
    shards/train-00000.safetensors  hidden [tokens, H], offsets [n + 1], records [n]
    manifest.json                   written last: the shards, their sizes and sha256

Shards are safetensors files: typed (bfloat16 included), memory-mapped and read by
slice without loading the file, and written one at a time and renamed into place, so
an interrupted build keeps every finished shard and resumes after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from kd_lightning.constants import PLAIN_TEMPLATE, PLAIN_TEMPLATE_WITH_INPUT
from kd_lightning.data.datamodule import counted_positions
from kd_lightning.models import frozen, last_hidden_state, lm_head
from kd_lightning.precision import cpu_bf16_matmuls

log = logging.getLogger(__name__)

#: the order in which fingerprints are compared: the first that differs is named
FINGERPRINT_FIELDS = ("teacher", "teacher_files", "tokenizer", "data", "max_length", "template", "dtype")
STORAGE_DTYPES = ("float32", "bfloat16")
SHARD_EXAMPLES = 512


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class CacheError(RuntimeError):
    """A teacher cache that cannot serve this run: missing, partial, corrupt or built for another config."""


def write_atomically(path: Path, write) -> None:
    """``write(temporary_path)``, then rename it to ``path``: a reader never sees half a file."""
    temporary = path.with_name(path.name + ".partial")
    write(temporary)
    os.replace(temporary, path)


def write_json(path: Path, value: dict) -> None:
    write_atomically(path, lambda target: target.write_text(json.dumps(value, indent=1, sort_keys=True)))


def mismatch(cached: dict, expected: dict) -> str | None:
    """The first fingerprint field whose values differ, in ``FINGERPRINT_FIELDS`` order."""
    return next((name for name in FINGERPRINT_FIELDS if cached.get(name) != expected.get(name)), None)


def token_hashes(batch: dict) -> list[int]:
    """A 63-bit hash of each example's tokens and labels (right-padded batch): the cache
    serves an example only to a batch that holds exactly the tokens it was built from."""
    hashes = []
    for ids, labels, length in zip(batch["input_ids"], batch["labels"], batch["attention_mask"].sum(1).tolist()):
        tokens = torch.stack([ids[:length], labels[:length]]).to(torch.int64).cpu().numpy().tobytes()
        hashes.append(int.from_bytes(hashlib.sha256(tokens).digest()[:8], "little") >> 1)
    return hashes


class TeacherCacheWriter:
    """Writes the cache of ``teacher`` over the given splits, shard by shard, resuming
    after the shards an interrupted build finished."""

    def __init__(self, directory: str | Path, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        if fingerprint["dtype"] not in STORAGE_DTYPES:
            raise ValueError(f"the cache dtype must be one of {', '.join(STORAGE_DTYPES)}, got {fingerprint['dtype']!r}")
        (self.directory / "shards").mkdir(parents=True, exist_ok=True)
        existing = self.directory / "fingerprint.json"
        if existing.is_file():
            differs = mismatch(json.loads(existing.read_text()), fingerprint)
            if differs is not None:
                raise CacheError(
                    f"{self.directory} holds a teacher cache built with another {differs}: "
                    "give kd-cache a new teacher_cache directory, or delete this one"
                )
        write_json(existing, fingerprint)

    def write(self, teacher: nn.Module, splits: dict, collate, batch_size: int, device: torch.device) -> dict:
        """Cache every split (name → dataset of encoded examples with a ``record`` column),
        then write the manifest. Returns the manifest."""
        dtype = getattr(torch, self.fingerprint["dtype"])
        head = lm_head(teacher)
        head_tensors = {"weight": head.weight.detach().cpu().contiguous()}
        if head.bias is not None:
            head_tensors["bias"] = head.bias.detach().cpu().contiguous()
        write_atomically(self.directory / "lm_head.safetensors", lambda target: save_file(head_tensors, target))
        shards = []
        for split, dataset in splits.items():
            for start in range(0, len(dataset), SHARD_EXAMPLES):
                path = self.directory / "shards" / f"{split}-{start // SHARD_EXAMPLES:05d}.safetensors"
                examples = dataset.select(range(start, min(start + SHARD_EXAMPLES, len(dataset))))
                if not path.is_file():
                    tensors = self.shard(teacher, examples, collate, batch_size, device, dtype, split)
                    write_atomically(path, lambda target: save_file(tensors, target))
                shards.append({"file": path.name, "split": split, "examples": len(examples), "sha256": file_sha256(path)})
        manifest = {
            "shards": shards,
            "hidden_size": head.weight.shape[1],
            "teacher_parameter_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters()),
        }
        write_json(self.directory / "manifest.json", manifest)
        return manifest

    @torch.no_grad()
    def shard(self, teacher, examples, collate, batch_size: int, device, dtype, split: str) -> dict[str, Tensor]:
        """The hidden states of the counted positions of ``examples``, example after example."""
        from tqdm.auto import tqdm

        hidden, counts, records, hashes = [], [], [], []
        started, tokens = time.perf_counter(), 0
        progress = tqdm(total=len(examples), desc=f"teacher cache ({split})", unit="example")
        for first in range(0, len(examples), batch_size):
            batch = collate([examples[index] for index in range(first, min(first + batch_size, len(examples)))])
            inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
            states = last_hidden_state(teacher, inputs)[:, :-1]
            counted = counted_positions(batch["labels"]).to(device)
            hidden.append(states[counted].to(dtype).cpu())
            counts.append(counted.sum(1).cpu())
            records.append(batch["record"])
            hashes += token_hashes(batch)
            tokens += int(batch["attention_mask"].sum())
            progress.update(len(batch["record"]))
            progress.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - started):.0f}")
        progress.close()
        counts = torch.cat(counts)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return {
            "hidden": torch.cat(hidden).contiguous(),
            "offsets": offsets,
            "records": torch.cat(records),
            "token_hashes": torch.tensor(hashes, dtype=torch.int64),
        }


class CachedTeacher(nn.Module):
    """The teacher as a cache: its lm_head (frozen) and the hidden states of every cached
    example, read from memory-mapped shards. The teacher's decoder layers are never built.

    Args:
        directory: a cache written by ``kd-cache``.
        fingerprint: the run's fingerprint; a cache built for another config is refused,
            naming the first field that differs.
        verify: check every shard's sha256 against the manifest (reads the cache once).
    """

    def __init__(self, directory: str | Path, fingerprint: dict | None = None, verify: bool = True):
        super().__init__()
        self.directory = Path(directory)
        self.cached_fingerprint = self.read_fingerprint()
        if fingerprint is not None:
            differs = mismatch(self.cached_fingerprint, fingerprint)
            if differs is not None:
                raise CacheError(
                    f"the teacher cache {self.directory} was built for another {differs} "
                    f"(cache: {self.cached_fingerprint.get(differs)!r}, this run: {fingerprint.get(differs)!r}); "
                    "build a cache for this config with kd-cache and the same overrides, "
                    "or run with the config the cache was built for"
                )
        manifest = self.read_manifest()
        self.live_parameter_bytes = manifest["teacher_parameter_bytes"]
        self.lm_head = self.read_lm_head()
        self.requires_grad_(False)
        self.shards, self.index = [], {}
        for shard in manifest["shards"]:
            path = self.directory / "shards" / shard["file"]
            if verify and (not path.is_file() or file_sha256(path) != shard["sha256"]):
                raise CacheError(f"the teacher cache shard {path} is missing or corrupt (sha256 differs): rebuild the cache")
            handle = self.open(path)
            offsets, records, hashes = (handle.get_tensor(name) for name in ("offsets", "records", "token_hashes"))
            for position, (record, tokens) in enumerate(zip(records.tolist(), hashes.tolist())):
                self.index[record] = (len(self.shards), int(offsets[position]), int(offsets[position + 1]), tokens)
            self.shards.append(handle.get_slice("hidden"))
        log.info("teacher cache %s: %d examples, %s states", self.directory, len(self.index), self.cached_fingerprint["dtype"])

    def read_fingerprint(self) -> dict:
        path = self.directory / "fingerprint.json"
        if not path.is_file():
            raise CacheError(f"no teacher cache at {self.directory} (no fingerprint.json): build it with kd-cache teacher_cache={self.directory}")
        return json.loads(path.read_text())

    def read_manifest(self) -> dict:
        path = self.directory / "manifest.json"
        if not path.is_file():
            done = len(list((self.directory / "shards").glob("*.safetensors")))
            raise CacheError(
                f"the teacher cache {self.directory} is incomplete ({done} shards written, no manifest): an interrupted "
                "kd-cache; run the same kd-cache command again to finish it"
            )
        return json.loads(path.read_text())

    def read_lm_head(self) -> nn.Linear:
        with self.open(self.directory / "lm_head.safetensors") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        rows, hidden_size = tensors["weight"].shape
        # built on the meta device: initialising its weights would draw from the global RNG
        head = nn.Linear(hidden_size, rows, bias="bias" in tensors, device="meta")
        head.load_state_dict(tensors, assign=True)
        return head

    @staticmethod
    def open(path: Path):
        try:
            return safe_open(path, framework="pt")
        except Exception as error:  # safetensors raises its own error types for bad headers
            raise CacheError(f"the teacher cache file {path} cannot be read ({error}): rebuild the cache") from error

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def counted_outputs(self, batch: dict) -> Tensor:
        """``[N, H]`` hidden states of the counted positions of a batch: example after
        example, in the order ``hidden[:, :-1][counted]`` gives for a live teacher. Each
        example is looked up by its ``record`` and must have the tokens it was cached with."""
        if "record" not in batch:
            raise KeyError(
                "a cached teacher needs each batch's 'record' (the example's index in its data file), "
                "which InstructionDataModule adds; batches without it need the live teacher"
            )
        rows = []
        for record, tokens in zip(batch["record"].tolist(), token_hashes(batch)):
            if record not in self.index:
                raise CacheError(
                    f"example {record} of the data file is not in the teacher cache {self.directory}: the cache was "
                    "built for another selection of examples (data.split_seed, data.val_size, data.max_train_examples); "
                    "rebuild it with this run's data overrides"
                )
            shard, start, end, cached_tokens = self.index[record]
            if tokens != cached_tokens:
                raise CacheError(
                    f"example {record} is tokenised differently from when the teacher cache {self.directory} was "
                    "built (another tokenizer, template or version of the data code): rebuild the cache"
                )
            rows.append(self.shards[shard][start:end])
        return torch.cat(rows).to(self.lm_head.weight.device, self.lm_head.weight.dtype)


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
    """What a run's teacher states depend on, from its config (``FINGERPRINT_FIELDS``)."""
    from omegaconf import OmegaConf

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
        "dtype": cfg.teacher_cache_dtype,
    }


def build(cfg) -> Path:
    """``kd-cache``: run the teacher of ``cfg`` over its training and validation examples
    and write the cache to ``cfg.teacher_cache`` (resuming an interrupted build)."""
    from hydra.utils import instantiate

    if not cfg.teacher_cache:
        raise ValueError("give the directory to write: kd-cache teacher_cache=DIR (and the same overrides as kd-train)")
    tokenizer = instantiate(cfg.model.tokenizer)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup()
    writer = TeacherCacheWriter(cfg.teacher_cache, run_fingerprint(cfg, tokenizer, datamodule))
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    device = torch.device("cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")
    teacher = frozen(instantiate(cfg.model.teacher)()).to(device)
    started = time.perf_counter()
    with cpu_bf16_matmuls(device.type):  # a bf16 teacher on a CPU without native bf16
        manifest = writer.write(
            teacher, {"train": datamodule.train_set, "validation": datamodule.val_set}, datamodule.collate,
            cfg.data.batch_size, device,
        )
    size = sum((writer.directory / "shards" / shard["file"]).stat().st_size for shard in manifest["shards"])
    log.info(
        "teacher cache %s: %d examples, %.1f MiB of %s states, in %.0f s",
        writer.directory, sum(shard["examples"] for shard in manifest["shards"]), size / 2**20,
        cfg.teacher_cache_dtype, time.perf_counter() - started,
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
