"""Names of the job directories of a sweep: one flat, readable directory per job.

Hydra's ``override_dirname`` joins a job's overrides as they were typed, so a path value
(``teacher_cache=/data/caches/dolly``) nests the job directory by its slashes. The
``job_dirname`` resolver, which ``hydra.sweep.subdir`` uses, names a path value by its
last component instead: ``0_model=tiny,teacher_cache=dolly,temperature=1``. A name too
long for the file system keeps the pairs that fit and ends in a short hash of the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from omegaconf import OmegaConf

RESOLVER = "job_dirname"
#: a file name may have 255 bytes; this leaves room for the job number in front
MAX_NAME_BYTES = 200


def override_value(value: str) -> str:
    """``value`` as a directory name allows it: a path by its last component (a trailing
    slash ignored), quotes dropped."""
    value = value.strip().strip("'\"")
    return value.rstrip("/").rsplit("/", 1)[-1] or value


def job_dirname(overrides: Iterable[str], exclude_keys: Iterable[str] = ()) -> str:
    """The overrides of a job as ``key=value`` pairs sorted by key and joined by commas,
    without ``exclude_keys`` and with no slash left: path values by their last component,
    group keys (``+experiment/budget=…``) with dots for their slashes."""
    excluded = set(exclude_keys)
    pairs = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") not in excluded:
            pairs.append(f"{key.replace('/', '.')}={override_value(value)}")
    return within_name_limit(",".join(sorted(pairs)))


def within_name_limit(name: str) -> str:
    """``name`` if it fits in ``MAX_NAME_BYTES``; else the shortest of its ``key=value``
    pairs that fit together (``divergence=fkl`` and ``temperature=2`` rather than long
    settings), in their order, then ``…`` and 8 hex digits of the full name's sha1."""
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = "…" + hashlib.sha1(name.encode()).hexdigest()[:8]
    pairs, kept, size = name.split(","), set(), len(digest.encode())
    for pair in sorted(pairs, key=len):
        if size + len(pair.encode()) + 1 > MAX_NAME_BYTES:
            break
        kept.add(pair)
        size += len(pair.encode()) + 1
    return ",".join([pair for pair in pairs if pair in kept] + [digest])


def register_resolvers() -> None:
    """Make ``${job_dirname:OVERRIDES,EXCLUDE_KEYS}`` available to configs (once)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda overrides, exclude_keys=(): job_dirname(overrides, exclude_keys))
