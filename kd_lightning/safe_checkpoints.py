"""Checkpoints read without running anything stored in them.

A ``.ckpt`` file is a pickle: loaded unrestricted, a crafted one calls any function on
the reader's machine. Every checkpoint kd_lightning reads (kd-eval, kd-export, a resumed
kd-train, the study driver) goes through :func:`load_checkpoint`, which is
``torch.load(weights_only=True)``: tensors, containers and plain values only. A
kd_lightning checkpoint holds nothing else; the distributed (FSDP) checkpoint
directories add the types of their ``.metadata`` index (:data:`DCP_METADATA_GLOBALS`),
which is read here with an unpickler restricted to them before
``torch.distributed.checkpoint`` reads it unrestricted.

Anything else is refused with :class:`UntrustedCheckpointError`, naming the file and
what it asked for, before any of it runs. A checkpoint from a source one trusts loads
unrestricted with ``trust=True`` (``--trust-checkpoint``, ``trust_checkpoint=true``).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

#: how to load a refused checkpoint on purpose, in each command
TRUST_HINT = (
    "If you trust its source, load it unrestricted with --trust-checkpoint (kd-eval, kd-export) "
    "or trust_checkpoint=true (kd-train)"
)
TRUST_CHECKPOINT_HELP = (
    "load the checkpoint unrestricted (pickled objects and code in it run): only for a checkpoint from a source "
    "you trust that kd_lightning refused"
)
#: the globals a distributed checkpoint's ``.metadata`` pickle is made of: (module, name)
DCP_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    )]
    + [
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
    ]
)
#: the file Lightning writes beside the shards of a distributed checkpoint
LIGHTNING_DCP_META = "meta.pt"


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint that holds more than weights and plain values: loading it could run code."""


def refusal(path: Path, wanted: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"refused to load the checkpoint {path}: it holds {wanted}, which no kd_lightning checkpoint holds and "
        f"which loading would construct or call, running code from the file. {TRUST_HINT}"
    )


def what_it_wanted(error: Exception) -> str:
    """The global a weights-only load stopped at, from torch's message."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if found:
        return f"a reference to {found.group(1)}"
    return "something other than tensors and plain values (" + str(error).strip().splitlines()[-1][:200] + ")"


def load_checkpoint(path: str | Path, trust: bool = False, map_location: Any = "cpu") -> Any:
    """The contents of the checkpoint file ``path``, read with ``torch.load(weights_only=True)``
    unless ``trust``; raises :class:`UntrustedCheckpointError` for one that needs more."""
    path = Path(path)
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise refusal(path, what_it_wanted(error)) from None


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that finds only :data:`DCP_METADATA_GLOBALS` and torch's dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def check_distributed_checkpoint(directory: str | Path) -> None:
    """Read the pickles of a distributed checkpoint directory (its ``.metadata`` index and
    Lightning's ``meta.pt``) restricted to the types they are made of; raise
    :class:`UntrustedCheckpointError` naming the file that holds anything else."""
    directory = Path(directory)
    index = directory / ".metadata"
    if index.is_file():
        try:
            with open(index, "rb") as stream:
                MetadataUnpickler(stream).load()
        except pickle.UnpicklingError as error:
            raise refusal(index, what_it_wanted(error)) from None
    if (directory / LIGHTNING_DCP_META).is_file():
        load_checkpoint(directory / LIGHTNING_DCP_META)


def check_checkpoint(path: str | Path, trust: bool = False) -> None:
    """Raise :class:`UntrustedCheckpointError` unless the checkpoint at ``path`` (a file or
    a distributed checkpoint directory) loads restricted; nothing to check with ``trust``."""
    path = Path(path)
    if trust or not path.exists():
        return
    if path.is_dir():
        check_distributed_checkpoint(path)
    else:
        load_checkpoint(path)
