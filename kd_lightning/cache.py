"""The teacher cache: the teacher's final hidden states, computed once per data set.

A sweep trains many students on the same examples; the teacher's part of every step is
the same each time. ``kd-cache`` runs the teacher once over the training and validation
examples and stores, for every counted position (a position whose next token is a
response token), its final hidden state ``h`` — the input of the lm_head — together
with the lm_head weight ``W``. Training then recomputes the teacher's logits as
``t = h Wᵀ`` inside the loss, exactly as the live teacher does, so every divergence,
temperature (per token too) and token policy sees the same logits. With a teacher of
another tokenizer (``cross_tokenizer``) the teacher's side is its own tokenisation of the
examples (``data.cross_tokenizer.teacher_side``): the states of every position that
predicts one of its response tokens, read back at the aligned groups' positions.

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
from kd_lightning.locking import refuse_if_being_built
from kd_lightning.models import frozen, last_hidden_state, lm_head
from kd_lightning.precision import cpu_bf16_matmuls

log = logging.getLogger(__name__)

#: the order in which fingerprints are compared: the first that differs is named
FINGERPRINT_FIELDS = ("teacher", "teacher_files", "tokenizer", "data", "max_length", "template", "dtype")
#: how the outputs are stored, besides ``dtype``: one build directory holds one format
STORAGE_FIELDS = ("format", "top_k")
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


def mismatch(cached: dict, expected: dict, fields: tuple[str, ...] = FINGERPRINT_FIELDS) -> str | None:
    """The first of ``fields`` whose values differ, in that order."""
    return next((name for name in fields if cached.get(name) != expected.get(name)), None)


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

    storage_dtypes = STORAGE_DTYPES

    def __init__(self, directory: str | Path, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        if fingerprint["dtype"] not in self.storage_dtypes:
            raise ValueError(f"the cache dtype must be one of {', '.join(self.storage_dtypes)}, got {fingerprint['dtype']!r}")
        (self.directory / "shards").mkdir(parents=True, exist_ok=True)
        existing = self.directory / "fingerprint.json"
        if existing.is_file():
            differs = mismatch(json.loads(existing.read_text()), fingerprint, STORAGE_FIELDS + FINGERPRINT_FIELDS)
            if differs is not None:
                raise CacheError(
                    f"{self.directory} holds a teacher cache built with another {differs}: "
                    "give kd-cache a new teacher_cache directory, or delete this one"
                )
        write_json(existing, fingerprint)

    def write(self, teacher: nn.Module, splits: dict, collate, batch_size: int, device: torch.device) -> dict:
        """Cache every split (name → dataset of encoded examples with a ``record`` column),
        then write the manifest. Returns the manifest."""
        self.write_teacher_parts(teacher)
        shards = []
        for split, dataset in splits.items():
            for start in range(0, len(dataset), SHARD_EXAMPLES):
                path = self.directory / "shards" / f"{split}-{start // SHARD_EXAMPLES:05d}.safetensors"
                examples = dataset.select(range(start, min(start + SHARD_EXAMPLES, len(dataset))))
                if not path.is_file():
                    tensors = self.shard(teacher, examples, collate, batch_size, device, split)
                    write_atomically(path, lambda target: save_file(tensors, target))
                shards.append({"file": path.name, "split": split, "examples": len(examples), "sha256": file_sha256(path)})
        manifest = {
            "shards": shards,
            **self.layout(teacher),
            "teacher_parameter_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters()),
        }
        write_json(self.directory / "manifest.json", manifest)
        return manifest

    def write_teacher_parts(self, teacher: nn.Module) -> None:
        """The lm_head weight (and bias) that turns the cached states into logits."""
        head = lm_head(teacher)
        head_tensors = {"weight": head.weight.detach().cpu().contiguous()}
        if head.bias is not None:
            head_tensors["bias"] = head.bias.detach().cpu().contiguous()
        write_atomically(self.directory / "lm_head.safetensors", lambda target: save_file(head_tensors, target))

    def layout(self, teacher: nn.Module) -> dict:
        """What the manifest records of the stored outputs' shapes."""
        return {"hidden_size": lm_head(teacher).weight.shape[1]}

    def outputs(self, teacher: nn.Module, counted_states: Tensor) -> dict[str, Tensor]:
        """What is stored of the counted positions' final hidden states ``[n, H]``: the states."""
        return {"hidden": counted_states.to(getattr(torch, self.fingerprint["dtype"])).cpu()}

    @torch.no_grad()
    def shard(self, teacher, examples, collate, batch_size: int, device, split: str) -> dict[str, Tensor]:
        """The stored outputs of the counted positions of ``examples``, example after example."""
        from tqdm.auto import tqdm

        outputs, counts, records, hashes = [], [], [], []
        started, tokens = time.perf_counter(), 0
        progress = tqdm(total=len(examples), desc=f"teacher cache ({split})", unit="example")
        for first in range(0, len(examples), batch_size):
            batch = collate([examples[index] for index in range(first, min(first + batch_size, len(examples)))])
            inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
            states = last_hidden_state(teacher, inputs)[:, :-1]
            counted = counted_positions(batch["labels"]).to(device)
            outputs.append(self.outputs(teacher, states[counted]))
            counts.append(counted.sum(1).cpu())
            records.append(batch["record"])
            hashes += token_hashes(batch)
            tokens += int(batch["attention_mask"].sum())
            progress.update(len(batch["record"]))
            progress.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - started):.0f}")
        progress.close()
        counts = torch.cat(counts)
        return {
            **{name: torch.cat([batch[name] for batch in outputs]).contiguous() for name in outputs[0]},
            "offsets": torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
            "records": torch.cat(records),
            "token_hashes": torch.tensor(hashes, dtype=torch.int64),
        }


class StoredTeacher(nn.Module):
    """A teacher read from a cache directory: the fingerprint checked, the shards verified
    and indexed by record, the stored outputs of each example read from memory-mapped
    shards by slice. The teacher's decoder layers are never built. Subclasses name the
    stored tensors (``output_names``) and turn an example's rows into the outputs.

    Args:
        directory: a cache written by ``kd-cache``.
        fingerprint: the run's fingerprint; a cache built for another config is refused,
            naming the first field that differs (of ``compared_fields``).
        verify: check every shard's sha256 against the manifest (reads the cache once).
    """

    output_names: tuple[str, ...] = ()
    compared_fields: tuple[str, ...] = FINGERPRINT_FIELDS

    def __init__(self, directory: str | Path, fingerprint: dict | None = None, verify: bool = True):
        super().__init__()
        self.directory = Path(directory)
        refuse_if_being_built(self.directory, "train from")
        self.cached_fingerprint = read_fingerprint(self.directory)
        if fingerprint is not None:
            differs = mismatch(self.cached_fingerprint, fingerprint, self.compared_fields)
            if differs is not None:
                raise CacheError(
                    f"the teacher cache {self.directory} was built for another {differs} "
                    f"(cache: {self.cached_fingerprint.get(differs)!r}, this run: {fingerprint.get(differs)!r}); "
                    "build a cache for this config with kd-cache and the same overrides, "
                    "or run with the config the cache was built for"
                )
        self.manifest = self.read_manifest()
        self.live_parameter_bytes = self.manifest["teacher_parameter_bytes"]
        self.shards, self.index = [], {}
        for shard in self.manifest["shards"]:
            path = self.directory / "shards" / shard["file"]
            if verify and (not path.is_file() or file_sha256(path) != shard["sha256"]):
                raise CacheError(f"the teacher cache shard {path} is missing or corrupt (sha256 differs): rebuild the cache")
            handle = self.open(path)
            offsets, records, hashes = (handle.get_tensor(name) for name in ("offsets", "records", "token_hashes"))
            for position, (record, tokens) in enumerate(zip(records.tolist(), hashes.tolist())):
                self.index[record] = (len(self.shards), int(offsets[position]), int(offsets[position + 1]), tokens)
            self.shards.append({name: handle.get_slice(name) for name in self.output_names})
        log.info("teacher cache %s: %d examples, %s", self.directory, len(self.index), self.describe())

    def describe(self) -> str:
        return f"{self.cached_fingerprint['dtype']} states"

    def read_manifest(self) -> dict:
        path = self.directory / "manifest.json"
        if not path.is_file():
            done = len(list((self.directory / "shards").glob("*.safetensors")))
            raise CacheError(
                f"the teacher cache {self.directory} is incomplete ({done} shards written, no manifest): an interrupted "
                "kd-cache; run the same kd-cache command again to finish it"
            )
        return json.loads(path.read_text())

    @staticmethod
    def open(path: Path):
        try:
            return safe_open(path, framework="pt")
        except Exception as error:  # safetensors raises its own error types for bad headers
            raise CacheError(f"the teacher cache file {path} cannot be read ({error}): rebuild the cache") from error

    def counted_rows(self, batch: dict) -> dict[str, Tensor]:
        """Each stored tensor's rows for the counted positions of a batch: example after
        example, in the order ``hidden[:, :-1][counted]`` gives for a live teacher. Each
        example is looked up by its ``record`` and must have the tokens it was cached with."""
        if "record" not in batch:
            raise KeyError(
                "a cached teacher needs each batch's 'record' (the example's index in its data file), "
                "which InstructionDataModule adds; batches without it need the live teacher"
            )
        rows = {name: [] for name in self.output_names}
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
            for name in self.output_names:
                rows[name].append(self.shards[shard][name][start:end])
        with torch.autocast("cpu", enabled=False):  # CPU autocast refuses to concatenate float16 (top-k log-probabilities)
            return {name: torch.cat(parts) for name, parts in rows.items()}


class CachedTeacher(StoredTeacher):
    """The exact cache: the teacher's lm_head (frozen) and the final hidden states of every
    cached example; the logits are recomputed as ``lm_head(h)``, exactly the live teacher's."""

    output_names = ("hidden",)

    def __init__(self, directory: str | Path, fingerprint: dict | None = None, verify: bool = True):
        super().__init__(directory, fingerprint, verify)
        self.lm_head = self.read_lm_head()
        self.requires_grad_(False)

    def read_lm_head(self) -> nn.Linear:
        with self.open(self.directory / "lm_head.safetensors") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        rows, hidden_size = tensors["weight"].shape
        # built on the meta device: initialising its weights would draw from the global RNG
        head = nn.Linear(hidden_size, rows, bias="bias" in tensors, device="meta")
        head.load_state_dict(tensors, assign=True)
        return head

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def counted_outputs(self, batch: dict) -> Tensor:
        """``[N, H]`` hidden states of the counted positions of a batch (``counted_rows``)."""
        return self.counted_rows(batch)["hidden"].to(self.lm_head.weight.device, self.lm_head.weight.dtype)


def read_fingerprint(directory: Path) -> dict:
    path = directory / "fingerprint.json"
    if not path.is_file():
        raise CacheError(f"no teacher cache at {directory} (no fingerprint.json): build it with kd-cache teacher_cache={directory}")
    return json.loads(path.read_text())


def open_cache(directory: str | Path, fingerprint: dict | None = None, verify: bool = True) -> StoredTeacher:
    """The teacher cache in ``directory``, in the format it was built in (exact or top-k)."""
    from kd_lightning.topk_cache import TopKCachedTeacher

    stored = read_fingerprint(Path(directory)).get("format", "exact")
    return (TopKCachedTeacher if stored == "topk" else CachedTeacher)(directory, fingerprint, verify)
