"""What a finetune run's output directory remembers about the run, and who may use it.

* :class:`OutputLock`: one finetune per ``--output`` at a time (``fcntl.flock``
  on ``OUTPUT/.lock``; the kernel drops the lock when the process dies, even
  on SIGKILL). Taking it also proves the directory is a writable directory,
  before any model is loaded.
* ``OUTPUT/run.json``: the run-defining settings (everything except
  :data:`~zoedge.settings.RESUME_FREE`), the history of resumes and the dev
  evaluations at the start and end of each process. ``--resume`` compares the
  command's settings with it and refuses any difference unless
  ``--allow-changes`` is given; allowed changes are applied and recorded.
* A fresh run (no checkpoint to resume) first removes what an earlier run left
  behind: the disk tier's working copy, the metrics, the exported model, the
  summary and the plot, so nothing stale is mixed into the new run.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from zoedge.errors import ConfigError
from zoedge.settings import RESUME_FREE, FinetuneSettings, flag, to_dict
from zoedge.store.atomic import atomic_write_bytes
from zoedge.train.checkpoint import UPDATES, WEIGHTS
from zoedge.train.update_log import changed_replay_error

RECORD = "run.json"
LOCK = ".lock"


class OutputLock:
    """Exclusive use of a finetune output directory (created when missing) for the ``with`` block.

    Raises:
        ConfigError: ``--output`` is a file, cannot be created or written, or another run holds it.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError("--output", f"{out} is a file, not a directory",
                              "give a directory path (it is created when missing)")
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError("--output", f"cannot write into {out} ({e.strerror})",
                              "choose a writable directory") from None
        if not os.access(out, os.W_OK):
            os.close(fd)
            raise ConfigError("--output", f"{out} is not writable", "choose a writable directory")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError("--output", f"{out} is in use by another zoedge finetune (pid {holder})",
                              "wait for that run to finish, or choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def running_pid(out: Path) -> str | None:
    """The pid of a finetune running in ``out`` now (it holds the :class:`OutputLock`), or None."""
    try:
        fd = os.open(Path(out) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def run_defining(s: FinetuneSettings, options: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide the trained weights (compared on resume); plugin options merged in."""
    out = {k: v for k, v in to_dict(s).items() if k not in RESUME_FREE and k not in ("opt", "lr", "eps", "weight_decay")}
    out["options"] = dict(sorted(options.items()))
    if s.schedule == "linear":
        out["steps"] = s.steps  # a linear schedule decays to 0 at --steps: changing it changes the run
    return out


def _write(out: Path, record: dict[str, Any]) -> None:
    atomic_write_bytes(out / RECORD, json.dumps(record, indent=1).encode())


def read_record(out: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("settings"), dict) else None


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in settings.items() if k != "options"}
    flat.update({f"opt {k}": v for k, v in settings.get("options", {}).items()})
    return flat


def _spell(name: str, value: Any) -> str:
    if name.startswith("opt "):
        key = name[4:]
        return f"--{key.replace('_', '-')} {value}" if key in ("lr", "eps", "weight_decay") else f"--opt {key}={value}"
    return f"{flag(name)} {value}"


def reconcile(out: Path, s: FinetuneSettings, options: dict[str, Any], resume_from: Path | None) -> dict[str, Any]:
    """Write (fresh run) or check (resume) ``run.json``; returns the record.

    Raises:
        ConfigError: on resume, settings differ from the checkpointed run's and ``--allow-changes`` is not given
            (names each setting and both values).
    """
    now = run_defining(s, options)
    record = read_record(out) if resume_from is not None else None
    if record is None:
        record = {"settings": now, "resumes": [], "evals": {}}
        _write(out, record)
        return record
    old, new = _flat(record["settings"]), _flat(now)
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    if changed and not s.allow_changes:
        first = next(iter(changed))
        listing = "; ".join(f"{_spell(k, b)} but the run used {_spell(k, a)}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume ({_spell(first, changed[first][1]).split(' ')[0]})",
                          f"the command differs from the checkpointed run: {listing}",
                          "repeat the run's settings (see OUTPUT/run.json), or add --allow-changes to continue "
                          "with the new values (recorded in summary.json)")
    state = json.loads((resume_from / "state.json").read_text())
    meaning = [_spell(k, b) for k, (a, b) in changed.items() if _changes_updates(k)]
    if meaning and state.get(WEIGHTS) == UPDATES:  # checked before run.json is rewritten
        raise changed_replay_error(resume_from, meaning)
    step = state["step"]
    record["resumes"].append({"step": step, "changed": changed})
    record["settings"] = now
    _write(out, record)
    return record


def update_meaning_changes(record: dict[str, Any]) -> list[str]:
    """Settings the latest resume changed that change what a logged update means (plugin options, the seed): a
    log of updates is not replayed or continued across them (see :meth:`zoedge.train.trainer.Trainer.resume`)."""
    changed = record["resumes"][-1]["changed"] if record.get("resumes") else {}
    return [_spell(k, b) for k, (a, b) in changed.items() if _changes_updates(k)]


def _changes_updates(name: str) -> bool:
    return name.startswith("opt ") or name == "seed"


def apply_resumed_changes(trainer: Any, record: dict[str, Any], s: FinetuneSettings, options: dict[str, Any]) -> None:
    """After ``trainer.resume()``: make allowed changes take effect (the checkpoint restored the old values)."""
    changed = record["resumes"][-1]["changed"] if record.get("resumes") else {}
    if not changed:
        return
    opt = trainer.opt
    group = opt.param_groups[0]
    for key, value in options.items():
        if key == "lr" and f"opt {key}" in changed:
            trainer.scheduler.base_lrs = [float(value)]
            group["lr"] = float(value) * trainer.scheduler.lr_lambdas[0](trainer.scheduler.last_epoch)
        elif key in group and f"opt {key}" in changed:
            group[key] = value
    if "seed" in changed:
        state = opt.state_dict()
        state["seed"] = s.seed
        opt.load_state_dict(state)


def record_evals(out: Path, record: dict[str, Any], start: int, before: dict[str, Any], end: int,
                 after: dict[str, Any]) -> dict[str, Any]:
    """Remember the dev evaluations at the start and end of this process (for the curves)."""
    evals = record.setdefault("evals", {})
    evals.setdefault(str(start), before)
    evals[str(end)] = after
    for k in [k for k in evals if int(k) > end]:  # from an abandoned continuation past a resumed checkpoint
        del evals[k]
    _write(out, record)
    return record


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines of steps 1..``step`` (a resume from ``step`` re-runs the later ones)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(m, dict) and isinstance(m.get("step"), int) and m["step"] <= step:
            keep.append(line)
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def clear_previous_outputs(out: Path, metrics: Path) -> None:
    """A fresh run: remove what an earlier run in ``out`` left (working copy, metrics, model, summary, plot)."""
    for name in ("working", "model", "model.tmp", "checkpoints"):
        shutil.rmtree(out / name, ignore_errors=True)
    for path in (out / "summary.json", out / "curves.png", metrics):
        path.unlink(missing_ok=True)
