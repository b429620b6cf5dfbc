"""Errors at the command line: one message naming the cause and the fix, no traceback.

The traceback comes back with ``--debug`` (``kd-eval``, ``kd-export``) or the
environment variable ``HYDRA_FULL_ERROR=1`` (all three commands).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import CompactHydraException
from torch.multiprocessing import ProcessRaisedException



class CommandError(CompactHydraException):
    """An error that Hydra reports as its message alone."""


def describe(error: BaseException) -> str:
    """``Type: message`` of ``error``; for an error raised in a spawned process (DDP,
    FSDP), the last line of that process's traceback, which names the error."""
    if isinstance(error, ProcessRaisedException):
        return str(error).strip().splitlines()[-1]
    return f"{type(error).__name__}: {error}"


@contextmanager
def reported_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """For argparse commands: an exception ends the command with ``prog: error: …`` on
    stderr and exit status 1."""
    try:
        yield
    except Exception as error:
        if debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {describe(error)}\n(--debug or HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


@contextmanager
def compact_errors(prog: str) -> Iterator[None]:
    """For Hydra task functions: an exception becomes a ``CommandError``, which Hydra
    prints without a traceback, followed by its hint at ``HYDRA_FULL_ERROR=1``."""
    try:
        yield
    except CompactHydraException:
        raise
    except Exception as error:
        raise CommandError(f"{prog}: error: {describe(error)}") from error
