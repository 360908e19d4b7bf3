"""Writing files so that a crash leaves either the old state or the whole new file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_durably(path: Path, data: bytes, mode: int, tmp: Path | None = None) -> None:
    """
    Write C{data} to C{path} with C{mode}: into a temporary file (C{tmp}, or
    a fresh one beside C{path}), flushed to disk, renamed over C{path}, and
    the directory flushed so the rename itself survives a power cut.
    """
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        tmp = Path(name)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    sync_directory(path.parent)


def sync_directory(path: Path) -> None:
    """Flush a directory, so a rename in it survives a power cut."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
