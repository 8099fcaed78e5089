"""A run folder's guard: one ``divmoe train`` at a time holds it, through a lock file.

``RUN/.lock`` is flock'ed for the whole life of the process and holds its pid. The kernel
drops the lock when the process ends however it ends (SIGKILL included), so a killed run
never leaves a stale lock behind; a second process on the same folder refuses to start
instead of interleaving its checkpoints and metrics with the first one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class RunError(RuntimeError):
    """A run folder in a state the requested action cannot work with."""


@contextlib.contextmanager
def locked_run(run_dir: Path):
    """Hold ``run_dir/.lock`` (the folder must exist); RunError if another process holds it."""
    path = Path(run_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(f"{run_dir} is in use by another divmoe train (pid {holder}, lock "
                           f"{path}); wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
