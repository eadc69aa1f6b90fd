"""Read-only outputs are refused up front, with the option named, as root too: the file system's refusal
(EACCES, EROFS) is simulated by patching the os / open calls for one folder, not by file permissions (which root
ignores)."""
from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest

import zoedge.train.job as job
from zoedge.cli import main
from tests.test_cli_finetune import setup  # noqa: F401  (fixture: tiny Llama HF dir + train.jsonl + base args)


def read_only(monkeypatch, folder: Path, code: int) -> None:
    """Every write under ``folder`` (creating, opening for writing, renaming into, removing) fails with ``code``,
    and ``os.access(..., W_OK)`` says no, as on a read-only mount or a folder of another user."""
    folder = os.path.realpath(folder)

    def inside(path) -> bool:
        try:
            return os.path.realpath(os.fspath(path)).startswith(folder)
        except TypeError:
            return False  # a file descriptor

    def refuse(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def guard(real, *, arg=0, writes=lambda *a, **k: True):
        def fn(*a, **k):
            if len(a) > arg and inside(a[arg]) and writes(*a, **k):
                refuse(a[arg])
            return real(*a, **k)
        return fn

    def write_mode(path, mode="r", *a, **k):
        return bool(set("wax+") & set(mode))

    def write_flags(path, flags, *a, **k):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))

    for name in ("mkdir", "unlink", "rmdir", "truncate"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), arg=1))
    monkeypatch.setattr(os, "open", guard(os.open, writes=write_flags))
    monkeypatch.setattr(builtins, "open", guard(builtins.open, writes=write_mode))
    monkeypatch.setattr(io, "open", guard(io.open, writes=write_mode))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if (mode & os.W_OK and inside(p))
                        else real_access(p, mode, *a, **k))


def no_model_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the read-only output was found")
    monkeypatch.setattr(job, "resolve_store", fail)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS], ids=["EACCES", "EROFS"])
@pytest.mark.parametrize("where", ["existing", "new-below"])
def test_read_only_output_is_refused_before_the_model_loads(setup, monkeypatch, capsys, code, where):
    tmp, _, base = setup
    (tmp / "ro").mkdir()
    out = tmp / "ro" if where == "existing" else tmp / "ro" / "run"
    no_model_load(monkeypatch)
    read_only(monkeypatch, tmp / "ro", code)
    assert main(base + ["--steps", "1", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "Traceback" not in err
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp / "ro").iterdir()) == []  # nothing was written


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS], ids=["EACCES", "EROFS"])
def test_read_only_metrics_path_is_refused(setup, monkeypatch, capsys, code):
    tmp, _, base = setup
    (tmp / "ro").mkdir()
    no_model_load(monkeypatch)
    read_only(monkeypatch, tmp / "ro", code)
    assert main(base + ["--steps", "1", "--output", str(tmp / "run"), "--metrics", str(tmp / "ro" / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--metrics" in err and "Traceback" not in err
