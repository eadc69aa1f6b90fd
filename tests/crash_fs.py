"""Crash-order harness: record what a function does to the file system, kill it before its k-th operation, and
model what survives.

:class:`CrashFS` patches the ``os`` / ``open`` functions that change a file system (opening for writing, fsync,
rename / replace, mkdir, unlink, rmdir, truncate) to log each call and to raise :class:`Crash` before operation
number ``at`` (and before every operation after it: a killed process does nothing more, its ``except`` blocks
included). :meth:`CrashFS.power_loss` then models an OS crash: every file whose bytes were not fsynced since
they last changed is torn (cut to half its length). Directory entries (creations, renames) are taken as durable
once made: the model is about file contents, the usual way data is lost.

A kill without :meth:`~CrashFS.power_loss` is a SIGKILL (what the page cache holds survives); with it, a power
cut. Writes done by native code (safetensors' Rust writer) are not operations, but the files they write are
torn like any other unless fsynced.
"""
from __future__ import annotations

import builtins
import hashlib
import io
import os
import stat
from pathlib import Path


class Crash(BaseException):
    """The simulated kill (a BaseException: nothing may catch it as an error and carry on)."""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(*roots: Path) -> dict[int, tuple[Path, str]]:
    """inode -> (path, sha256) of every regular file under ``roots``."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[st.st_ino] = (p, _digest(p))
    return out


class CrashFS:
    """Use as a context manager around the operation under test (see the module docstring).

    Args:
        roots: the folders (or files) the operation writes; :meth:`power_loss` tears files under them.
        at: the 0-based number of the operation to crash before (None: never crash, only log).
    """

    WRITE_MODES = set("wax+")

    def __init__(self, *roots: Path, at: int | None = None) -> None:
        self.roots, self.at = [Path(r) for r in roots], at
        self.log: list[tuple[str, str]] = []
        self.crashed = False
        self.before = {ino: h for ino, (_, h) in files_under(*self.roots).items()}  # durable: there before
        self.durable: dict[int, str] = {}  # inode -> content at its last fsync
        self._saved: list[tuple[object, str, object]] = []

    # ------------------------------------------------------------------ the log
    def _op(self, name: str, *paths: object) -> None:
        if self.crashed:
            raise Crash(f"already crashed (then {name})")
        if self.at is not None and len(self.log) == self.at:
            self.crashed = True
            raise Crash(f"crashed before operation {self.at}: {name} {paths}")
        self.log.append((name, " ".join(str(p) for p in paths)))

    def _wrap(self, owner: object, attr: str, make) -> None:
        real = getattr(owner, attr)
        self._saved.append((owner, attr, real))
        setattr(owner, attr, make(real))

    def __enter__(self) -> CrashFS:
        fs = self

        def opener(real):
            def open_(file, mode="r", *a, **kw):
                if isinstance(file, (str, bytes, os.PathLike)) and fs.WRITE_MODES & set(mode):
                    fs._op("open-" + mode, file)
                return real(file, mode, *a, **kw)
            return open_

        def os_open(real):
            def open_(path, flags, *a, **kw):
                if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
                    fs._op("os.open", path)
                return real(path, flags, *a, **kw)
            return open_

        def fsync(real):
            def fsync_(fd):
                fd = fd if isinstance(fd, int) else fd.fileno()
                target = os.readlink(f"/proc/self/fd/{fd}")
                fs._op("fsync", target)
                real(fd)
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    fs.durable[st.st_ino] = _digest(Path(target))
            return fsync_

        def logged(name):
            def make(real):
                def op(*a, **kw):
                    fs._op(name, *a[:2])
                    return real(*a, **kw)
                return op
            return make

        self._wrap(builtins, "open", opener)
        self._wrap(io, "open", opener)
        self._wrap(os, "open", os_open)
        self._wrap(os, "fsync", fsync)
        for name in ("replace", "rename", "mkdir", "unlink", "rmdir", "truncate", "ftruncate", "link", "symlink"):
            self._wrap(os, name, logged(name))
        return self

    def __exit__(self, kind, value, tb) -> bool:
        for owner, attr, real in reversed(self._saved):
            setattr(owner, attr, real)
        return kind is Crash  # the kill is the expected end of a crashed run

    # ------------------------------------------------------------------ after the kill
    def power_loss(self) -> list[Path]:
        """Tear every file under the roots not durable (not there before with these bytes, not fsynced with them);
        returns the torn files."""
        torn = []
        for ino, (path, digest) in files_under(*self.roots).items():
            if self.before.get(ino) == digest or self.durable.get(ino) == digest:
                continue
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            torn.append(path)
        return torn

    def ops(self) -> list[str]:
        return [f"{name} {arg}" for name, arg in self.log]
