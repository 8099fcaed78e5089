"""Writing output files: atomically, with the permissions the user's umask gives, into a
checked output folder.

Every file divmoe writes into a run or analysis folder goes through here, so a crash or a
kill leaves either the old file or the new one (never half of one), and every file and
folder of a run carries the same permissions.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    # os.umask can only be read by setting it; the process is single-threaded where we write.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode ``mkdir`` would give a new folder (mkdtemp's private 0o700 is not that)."""
    return 0o777 & ~umask()


def fsync_folder(path: Path) -> None:
    """Make renames inside ``path`` durable (a rename is only on disk once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary sibling, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes it private; the file is as readable as the run
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot be (or become) a folder.

    Raises ValueError naming the path when it is an existing file or lies under one.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file, not a folder; give a folder path "
                         f"(it is created if missing)")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, so no folder can be made under it")
    return path
