"""What a finetune run's output directory remembers about the run, and who may use it.

* :class:`OutputLock`: one finetune per ``--output`` at a time (``fcntl.flock``
  on ``OUTPUT/.lock``; the kernel drops the lock when the process dies, even
  on SIGKILL). Taking it also proves the directory is a writable directory,
  before any model is loaded.
* ``OUTPUT/run.json``: the run-defining settings (everything except
  :data:`~zoedge.settings.RESUME_FREE`), the history of resumes and the dev
  evaluations at the start and end of each process.
* The run's identity, recorded in every checkpoint (``state.json`` key ``"run"``,
  written by the trainer): the run-defining settings, the store's
  (:func:`store_identity`: a digest of its manifest's content, dtype, quant,
  layout) and the data's (:func:`data_identity`: the sha256 of the train/dev/test
  files). ``--resume`` compares the command with the checkpoint's own record (with
  ``run.json`` only for checkpoints that have none): a different store or changed
  data is refused always, other settings unless ``--allow-changes`` is given
  (allowed changes are applied and recorded).
* A fresh run (no checkpoint to resume) first removes what an earlier run left
  behind (:func:`zoedge.output_dir.clear`), so nothing stale is mixed into the new run.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from zoedge import output_dir
from zoedge.errors import ConfigError, StoreError
from zoedge.settings import RESUME_FREE, FinetuneSettings, flag, to_dict
from zoedge.store.atomic import atomic_write_bytes
from zoedge.train.checkpoint import UPDATES, WEIGHTS
from zoedge.train.update_log import changed_replay_error

RECORD = "run.json"
LOCK = output_dir.LOCK
#: checkpoint state.json key of the run's identity (settings, store, data)
IDENTITY = "run"


class OutputLock:
    """Exclusive use of a finetune output directory (created when missing) for the ``with`` block.

    The folder is claimed first (:func:`zoedge.output_dir.claim`: the run marker in a new folder).

    Raises:
        ConfigError: ``--output`` is a file, not empty and not a zoedge run, cannot be created or written, or
            another run holds it.
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
            output_dir.claim(out)
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


def store_identity(store: Path) -> dict[str, Any]:
    """What a checkpoint's weights are bound to: the store's content (a digest of its manifest without the
    record of where it was prepared from, so a byte-equal re-prepare is the same store), dtype, quant and
    layout (architecture, family, blocks)."""
    from zoedge.store.manifest import MANIFEST_NAME
    try:
        manifest = json.loads((Path(store) / MANIFEST_NAME).read_text())
    except (OSError, ValueError) as e:
        raise StoreError(store, f"its manifest is unreadable ({e})", "re-run `zoedge prepare`") from None
    content = {k: v for k, v in manifest.items() if k != "source"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return {"path": str(store), "content_sha256": digest, "dtype": manifest.get("dtype"),
            "quant": manifest.get("quant"), "layout": {"architecture": manifest.get("architecture"),
                                                       "family": manifest.get("family"),
                                                       "blocks": [b.get("name") for b in manifest.get("blocks", [])]}}


def data_identity(s: Any) -> dict[str, dict[str, str]]:
    """The data files' contents: split name -> ``{"path", "sha256"}`` for each of --train/--dev/--test given."""
    from zoedge.store.verify import sha256_file
    out = {}
    for name in ("train", "dev", "test"):
        path = getattr(s, name)
        if path is not None and Path(path).is_file():
            out[name] = {"path": str(path), "sha256": sha256_file(Path(path))}
    return out


def checkpoint_identity(checkpoint: Path) -> dict[str, Any] | None:
    """The run identity a checkpoint recorded (None: a checkpoint of an older zoedge)."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError):
        return None
    ident = state.get(IDENTITY) if isinstance(state, dict) else None
    return ident if isinstance(ident, dict) else None


def check_store(checkpoint: Path, store_id: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` on another store than the one it was made on (``--allow-changes`` does
    not cover it: the weights the checkpoint does not hold, e.g. quantized matrices, come from the store).

    Raises:
        StoreError: naming both stores and what differs.
    """
    mine = (checkpoint_identity(checkpoint) or {}).get("store")
    if mine is None:
        raise StoreError(checkpoint, "records no identity of the store it was made on (an older zoedge)",
                         "start a fresh run in another --output")
    if mine.get("content_sha256") == store_id["content_sha256"]:
        return
    differ = [f"{k} {store_id.get(k)} (the checkpoint was made on {mine.get(k)})" for k in ("dtype", "quant", "layout")
              if mine.get(k) != store_id.get(k)] or ["other weights (its blocks' digests differ)"]
    raise StoreError(store_id["path"], f"is not the store checkpoint {checkpoint.name} was made on "
                     f"({mine.get('path')}): {'; '.join(differ)}; resuming would silently mix the two",
                     "resume on the run's own store (prepare it again with the run's options), or start a fresh "
                     "run in another --output")


def _check_data(checkpoint: Path, recorded: dict[str, Any], data_id: dict[str, Any]) -> None:
    changed = []
    for name in sorted(set(recorded) | set(data_id)):
        a, b = recorded.get(name, {}), data_id.get(name, {})
        if a.get("sha256") != b.get("sha256") and (a or b):
            changed.append(f"--{name} {b.get('path')} (sha256 {str(b.get('sha256'))[:12]}...) but the checkpoint "
                           f"was trained on {a.get('path')} (sha256 {str(a.get('sha256'))[:12]}...)")
    if changed:
        raise ConfigError(f"--resume (--{changed[0].split(' ')[0][2:]})", "the data differ from the checkpointed "
                          f"run's: {'; '.join(changed)} (its dev/test could now hold examples it trained on)",
                          "restore the run's data files, or start a fresh run in another --output "
                          "(--allow-changes does not cover data)")


def reconcile(out: Path, s: FinetuneSettings, options: dict[str, Any], resume_from: Path | None,
              data_id: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write (fresh run) or check (resume) ``run.json``; returns the record.

    On resume the command is compared with the checkpoint's own record (:data:`IDENTITY`), or with ``run.json``
    for a checkpoint of an older zoedge that has none.

    Raises:
        ConfigError: on resume, the data files differ from the checkpoint's, or settings differ from the
            checkpointed run's and ``--allow-changes`` is not given (names each setting and both values), or
            there is no record of the run's settings at all.
    """
    now = run_defining(s, options)
    if resume_from is None:
        record = {"settings": now, "resumes": [], "evals": {}}
        _write(out, record)
        return record
    ident = checkpoint_identity(resume_from)
    record = read_record(out)
    if ident is None and record is None:
        raise ConfigError("--resume", f"neither {resume_from} nor {out / RECORD} records the run's settings",
                          "start a fresh run in another --output")
    if ident is not None:
        _check_data(resume_from, ident.get("data", {}), data_id or {})
    recorded = ident["settings"] if ident is not None else record["settings"]
    record = record or {"settings": recorded, "resumes": [], "evals": {}}
    old, new = _flat(recorded), _flat(now)
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

