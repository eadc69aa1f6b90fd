"""What zoedge writes, removes and refuses: the one owner of every path a command writes into.

* **Writes.** A finetune's ``--output`` gets :data:`MARKER` (``.zoedge-run``: the run's id and the files it
  wrote outside the folder) before anything else; then its own entries (:data:`RUN_ENTRIES`). A directory is
  replaced whole with :func:`replace_dir` (an exchange: a kill at any moment leaves the old or the new one).
* **Removes.** Only what it can prove it wrote: the entries of :data:`RUN_ENTRIES` inside a folder that holds
  the marker, and files outside the folder that the marker lists (a ``--metrics`` path).
* **Refuses.** An output folder that is not empty and holds no marker (it is not a zoedge run), and any
  written path that equals, contains or lies inside an input (model, store, data files, cache), compared as
  resolved real paths (symlinks, ``..``) and, for existing files, by inode (hard links): see
  :func:`check_apart`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from zoedge.errors import ConfigError
from zoedge.store.atomic import atomic_write_bytes

MARKER = ".zoedge-run"
LOCK = ".lock"
#: Everything a finetune writes into its output folder (the marker, the lock and the run record aside).
RUN_ENTRIES = ("working", "model", "model.tmp", "adapter", "adapter.tmp", "checkpoints", "summary.json", "curves.png",
               "metrics.jsonl")


# --------------------------------------------------------------------------------------------- aliasing paths
def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _relation(out: Path, inp: Path) -> str | None:
    """How written path ``out`` aliases input ``inp`` ("is", "contains", "lies inside"), or None."""
    a, b = _real(out), _real(inp)
    if a == b:
        return "is"
    try:
        if a.exists() and b.exists() and os.path.samefile(a, b):  # a hard link of the same file
            return "is"
    except OSError:
        pass
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "lies inside"
    return None


def check_apart(outputs: Mapping[str, str | Path | None], inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse any written path that equals, contains or lies inside an input.

    Args:
        outputs: option -> a path the command writes (None: not used).
        inputs: what -> a path the command reads (None: not used).

    Raises:
        ConfigError: naming the option, both paths and the fix.
    """
    for option, out in outputs.items():
        if out is None:
            continue
        for what, inp in inputs.items():
            if inp is None:
                continue
            how = _relation(Path(out), Path(inp))
            if how is not None:
                raise ConfigError(option, f"{out} {how} {what} {inp} (zoedge never writes into what it reads)",
                                  f"choose a {option} path apart from {inp}")


# ------------------------------------------------------------------------------------------ run directories
def _read_marker(out: Path) -> dict | None:
    try:
        record = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def is_run(out: Path) -> bool:
    """Whether ``out`` holds a zoedge run (its marker)."""
    return _read_marker(Path(out)) is not None


def check_claimable(out: Path) -> None:
    """Refuse an ``--output`` that zoedge may not write into (nothing is changed here).

    Raises:
        ConfigError: ``out`` is a file, or a folder that is not empty and not a zoedge run.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--output", f"{out} is a file, not a directory",
                          "give a directory path (it is created when missing)")
    real = _real(out)
    for parent in real.parents:  # another run replaces or clears its entries whole (model/, checkpoints/, ...)
        entry = real.relative_to(parent).parts[0]
        if entry in (*RUN_ENTRIES, MARKER, LOCK, "run.json") and is_run(parent):
            raise ConfigError("--output", f"{out} lies inside {entry} of the zoedge run {parent}",
                              "give a folder outside other runs' own entries")
    if not out.is_dir() or is_run(out):
        return
    try:
        found = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    except OSError as e:
        raise ConfigError("--output", f"cannot read {out} ({e.strerror})", "choose a readable directory") from None
    if found:
        shown = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
        raise ConfigError("--output", f"{out} is not empty ({shown}) and is not a zoedge run (no {MARKER})",
                          "give a new or empty directory: zoedge removes only files it wrote")


def own_paths(out: Path) -> dict[str, Path]:
    """The run's own entries (other written paths must not alias them): name -> path."""
    return {f"the run's {name}": Path(out) / name for name in (*RUN_ENTRIES, MARKER, LOCK, "run.json")}


def claim(out: Path) -> str:
    """Make ``out`` a zoedge run (write the marker first into a new or empty folder); returns the run's id.

    Raises:
        ConfigError: as :func:`check_claimable`.
    """
    check_claimable(out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(out)
    if marker is None:
        marker = {"run_id": uuid.uuid4().hex, "written": []}
        atomic_write_bytes(out / MARKER, json.dumps(marker, indent=1).encode())
    return marker["run_id"]


def _own_external(out: Path) -> set[str]:
    return set((_read_marker(out) or {}).get("written", []))


def adopt_external(out: Path, path: Path, option: str) -> None:
    """Allow the run in ``out`` to write ``path`` (outside ``out/RUN_ENTRIES``), recording it in the marker.

    A path already listed is the run's own; an absent or empty file is taken; any other file is refused.

    Raises:
        ConfigError: ``path`` holds data zoedge did not write.
    """
    key = str(_real(path))
    own = _own_external(out)
    if key in own:
        return
    if path.is_file() and path.stat().st_size > 0:
        raise ConfigError(option, f"{path} exists and was not written by this run",
                          f"remove it, or choose another {option} path (zoedge never overwrites files it did not "
                          "write)")
    marker = _read_marker(out) or {"run_id": uuid.uuid4().hex, "written": []}
    marker["written"] = sorted(own | {key})
    atomic_write_bytes(out / MARKER, json.dumps(marker, indent=1).encode())


def clear(out: Path, extra: Iterable[Path] = ()) -> None:
    """A fresh run in a zoedge run folder: remove what an earlier run there wrote (:data:`RUN_ENTRIES`) and the
    files in ``extra`` that the marker lists as the run's own; nothing else."""
    out = Path(out)
    if not is_run(out):
        return
    for name in RUN_ENTRIES:
        remove(out / name)
    own = _own_external(out)
    for path in extra:
        if str(_real(path)) in own:
            remove(path)


def remove(path: Path) -> None:
    """Remove a file or folder zoedge wrote (missing is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- replacing a folder
RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    fn = getattr(_libc, "renameat2", None) if _libc else None
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def aside(final: Path) -> Path:
    """Where :func:`replace_dir` keeps the old folder while it renames without an exchange."""
    return final.with_name(f".old-{final.name}")


def replace_dir(new: Path, final: Path) -> None:
    """Put the complete folder ``new`` at ``final``; a kill at any moment leaves the old folder or the new one.

    An existing ``final`` is exchanged with ``new`` in one rename and then removed; where the file system has
    no exchange it is first renamed to :func:`aside` (which :func:`restore_aside` puts back after a kill
    between the two renames).
    """
    if not final.exists():
        os.replace(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # now the old folder
        return
    old = aside(final)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def restore_aside(final: Path) -> None:
    """After a kill inside :func:`replace_dir`: put the old folder back when the new one never arrived."""
    old = aside(final)
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


# ------------------------------------------------------------------------------------------- result files
def result_file(path: str | Path | None, inputs: Mapping[str, str | Path | None], option: str = "--json") -> Path | None:
    """A command's result file (None for none or ``-``, stdout), checked before the work starts: not a folder,
    in an existing folder, apart from the inputs (:func:`check_apart`).

    Raises:
        ConfigError: naming the option.
    """
    if path is None or str(path) == "-":
        return None
    target = Path(path)
    if target.is_dir():
        raise ConfigError(option, f"{target} is a directory", f"give a file name, e.g. {option} {target / 'out.json'}")
    if not target.parent.is_dir():
        raise ConfigError(option, f"the directory of {target} does not exist", f"create {target.parent} first")
    check_apart({option: target}, inputs)
    return target


def write_result(path: Path, text: str, option: str = "--json") -> None:
    """Write a result file atomically (whole or not at all).

    Raises:
        ConfigError: it cannot be written (disk full, permissions).
    """
    try:
        atomic_write_bytes(Path(path), text.encode())
    except OSError as e:
        raise ConfigError(option, f"cannot write {path} ({e.strerror or e})", "free disk space or choose another "
                          "file") from None
