"""Writers' locks: one writer at a time for an output folder on this machine."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from pipeline.guard import output_paths
from pipeline.guard.errors import StageError

LOCKS = Path(tempfile.gettempdir()) / "birnn-locks"


@contextlib.contextmanager
def exclusive(target: str | os.PathLike, hint: str) -> Iterator[None]:
    """Hold the writer's lock of ``target`` for the block: a second writer on this machine is
    refused in one line (``hint``: what to do instead). The lock is an flock on a file named
    after the target's path in the temporary folder, not beside the target: a stage that
    stops early leaves its outputs untouched. The kernel releases it when its holder dies,
    however it dies."""
    target = output_paths.resolve("output folder", target)
    LOCKS.mkdir(mode=0o1777, exist_ok=True)
    lock = LOCKS / f"{hashlib.sha256(str(target).encode()).hexdigest()[:32]}.lock"
    with open(lock, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise StageError(f"{target}: another process is writing it (pid {holder}): "
                             f"{hint}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
