"""Leases: a process that reads a store holds one, and nothing deletes or rebuilds a store while a lease is live.

A lease is a file ``<store>/.leases/<pid>@<host>-<n>`` that its process holds an exclusive ``fcntl.flock`` on
for as long as it uses the store. The kernel drops the lock when the process ends, however it ends (even
SIGKILL), so a lease file whose lock can be taken is stale: :func:`live_holders` removes it and does not count
it. Commands that delete or rebuild a store (``zoedge cache prune``, the cache's rebuild of a store whose source
changed, ``zoedge prepare`` into an existing store) ask :func:`live_holders` first, under the store's build
lock, and leave a store in use alone; a lease is taken under the same lock (see
:func:`zoedge.store.cache.prepared_store`), so no store is deleted between its check and its lease.

A store that cannot be written (read-only media) gets no lease: nothing can delete it either.
"""
from __future__ import annotations

import fcntl
import itertools
import os
import socket
from pathlib import Path

LEASES = ".leases"
_counter = itertools.count()


class StoreLease:
    """This process's claim on ``store`` until :meth:`release` (or the ``with`` block's end, or the process's)."""

    def __init__(self, store: Path) -> None:
        self.store = Path(store)
        self.path: Path | None = None
        self.fd: int | None = None
        folder = self.store / LEASES
        name = f"{os.getpid()}@{socket.gethostname()}-{next(_counter)}"
        try:
            folder.mkdir(exist_ok=True)
            fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return  # a read-only store: nothing can delete it
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new file no one else knows of: never blocks
        self.path, self.fd = folder / name, fd

    def release(self) -> None:
        if self.fd is None:
            return
        assert self.path is not None
        self.path.unlink(missing_ok=True)  # unlinked while still locked: no one takes it for stale meanwhile
        os.close(self.fd)
        self.fd = self.path = None

    def __enter__(self) -> StoreLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_holders(store: Path) -> list[str]:
    """``pid@host`` of every live lease on ``store``; stale lease files (their process is gone) are removed."""
    folder = Path(store) / LEASES
    live = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # released meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live.append(path.name.rsplit("-", 1)[0])
            continue
        finally:
            os.close(fd)  # closing drops the lock taken on a stale lease
        path.unlink(missing_ok=True)
    return live


def in_use(store: Path) -> str | None:
    """Text naming the live holders of ``store`` ("pid 123@host, ..."), or None when no process uses it."""
    holders = live_holders(store)
    return ", ".join(f"pid {h}" for h in holders) if holders else None
