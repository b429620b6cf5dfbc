"""A lock on a directory that one process builds and others read (the teacher cache).

The builder holds :func:`directory_lock` for as long as it writes; the lock is a file
``DIR/build.lock`` naming its holder (pid, host, command, start time). A second builder
is refused with :class:`DirectoryLockedError`, which names the holder and what to do, and
a reader calls :func:`refuse_if_being_built` before it trusts the directory.

The lock file is written whole under a private name and then hard-linked to
``build.lock``: ``os.link`` fails when the name exists, atomically (also on NFS, where
``O_CREAT | O_EXCL`` was long unreliable), and a reader never sees a half-written
holder. A lock left by a process that no longer exists on this host is stale: a builder
takes it over; on another host liveness cannot be checked, so the message says to
delete the file once that process is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_FILE_NAME = "build.lock"


@dataclass(frozen=True)
class LockHolder:
    """The process that holds a directory lock, as its lock file records it."""

    pid: int
    host: str
    command: str
    started: str  # local time, ISO 8601
    token: str  # tells this holder's file from a later one of the same pid

    @classmethod
    def of_this_process(cls, command: str | None = None) -> LockHolder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            command=command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            started=time.strftime("%Y-%m-%d %H:%M:%S%z"),
            token=secrets.token_hex(8),
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} ({self.command})"

    def is_alive(self) -> bool | None:
        """Whether the holder still runs: ``None`` when it runs on another host, where
        its pid says nothing."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)  # signal 0: checks existence, sends nothing
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        return True


class DirectoryLockedError(RuntimeError):
    """A directory another process is building (or whose lock file cannot be read)."""

    def __init__(self, message: str, lock_file: Path, holder: LockHolder | None):
        super().__init__(message)
        self.lock_file, self.holder = lock_file, holder


def lock_file(directory: str | Path) -> Path:
    return Path(directory) / LOCK_FILE_NAME


def read_holder(path: Path) -> LockHolder | None:
    """The holder recorded in the lock file ``path``; ``None`` when there is no lock.
    A lock file that is not a holder record is a :class:`DirectoryLockedError`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return LockHolder(**json.loads(text))
    except (ValueError, TypeError) as error:
        raise DirectoryLockedError(
            f"{path} exists but is not a lock record ({error}); if no kd-cache build is running on "
            f"{path.parent}, delete {path} and run again",
            path, None,
        ) from None


def held_message(path: Path, holder: LockHolder, doing: str) -> str:
    """Why ``doing`` is refused while ``holder`` holds ``path``, and what to do."""
    alive = holder.is_alive()
    if alive is False:  # only readers see this: a builder takes a stale lock over
        return (
            f"{path.parent} was being built by {holder.describe()}, which no longer runs: the build was interrupted "
            f"and the directory may be incomplete. Run the same kd-cache command again to finish it (it takes the "
            f"stale lock {path} over), or delete {path} if the build had finished"
        )
    where = "still running" if alive else "on another host, whose processes cannot be checked from here"
    return (
        f"cannot {doing} {path.parent}: it is being built by {holder.describe()}, {where}. Wait for that build to "
        f"finish, or, if that process is gone, delete the lock file {path} and run again"
    )


def try_to_lock(path: Path, holder: LockHolder) -> bool:
    """Create the lock file ``path`` recording ``holder``; ``False`` when it exists."""
    private = path.with_name(f"{path.name}.{holder.token}")
    private.write_text(json.dumps(asdict(holder)))
    try:
        os.link(private, path)  # atomic and exclusive: fails if path exists
        return True
    except FileExistsError:
        return False
    finally:
        private.unlink(missing_ok=True)


def remove_stale_lock(path: Path, stale: LockHolder) -> None:
    """Remove the lock file ``path`` if it still records ``stale`` (renamed aside first,
    so that a lock another builder took in the meantime is put back, not deleted)."""
    aside = path.with_name(f"{path.name}.stale-{secrets.token_hex(8)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another builder removed it first
        return
    try:
        if read_holder_quietly(aside) != stale:  # a fresh lock, not the stale one: restore it
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    finally:
        aside.unlink(missing_ok=True)


def read_holder_quietly(path: Path) -> LockHolder | None:
    try:
        return read_holder(path)
    except DirectoryLockedError:
        return None


@contextlib.contextmanager
def directory_lock(directory: str | Path, command: str | None = None) -> Iterator[LockHolder]:
    """Hold the build lock of ``directory`` (created if missing) while the block runs.

    Raises :class:`DirectoryLockedError` naming the holder when another process holds
    it; a lock whose holder no longer runs on this host is taken over. ``command``
    describes this process in the lock (default: its command line). The lock is
    released when the block ends, by an exception too.
    """
    path = lock_file(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = LockHolder.of_this_process(command)
    for _ in range(2):  # a second try after removing a stale lock
        if try_to_lock(path, holder):
            break
        other = read_holder(path)
        if other is not None and other.is_alive() is not False:
            raise DirectoryLockedError(held_message(path, other, "build"), path, other)
        if other is not None:
            remove_stale_lock(path, other)
    else:
        raise DirectoryLockedError(f"could not take the lock {path}: another builder took it first; run again", path, None)
    try:
        yield holder
    finally:
        if read_holder_quietly(path) == holder:
            path.unlink(missing_ok=True)


def refuse_if_being_built(directory: str | Path, reader: str = "read") -> None:
    """Raise :class:`DirectoryLockedError` when ``directory`` has a build lock: a build
    is running (here or on another host), or one was interrupted and left the lock.
    ``reader`` says what the caller wanted to do, for the message (e.g. ``"train from"``)."""
    path = lock_file(directory)
    holder = read_holder(path)
    if holder is not None:
        raise DirectoryLockedError(held_message(path, holder, reader), path, holder)
