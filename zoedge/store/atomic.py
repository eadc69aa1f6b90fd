"""zoedge's one atomic file write: temp file + fsync + rename, so readers see all of a file or none of it."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from zoedge.errors import StoreError


def atomic_write_bytes(path: Path, data: bytes | memoryview, *, per_process: bool = False) -> None:
    """Write ``data`` to ``path`` via a temp sibling + fsync + rename.

    ``per_process`` names the temp file after the process, for files that several processes may write at
    once (the last rename wins; every version is whole).
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp" if per_process else path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A partial temp file is never read (only renamed files count), but on a full disk
        # it holds the space the user needs to free: remove it.
        tmp.unlink(missing_ok=True)
        raise


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (a file inside a temporary folder that is renamed into place later) and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a folder, so the names created in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text, with a per-process temp file."""
    atomic_write_bytes(path, text.encode(), per_process=True)


def write_error(path: Path | str, what: str, error: OSError, fix: str) -> StoreError:
    """The error for an ``OSError`` while writing ``what`` to ``path``: disk full named as such, else its reason."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full"
    else:
        reason = error.strerror or str(error)
    return StoreError(path, f"cannot write {what} ({reason})", fix)
