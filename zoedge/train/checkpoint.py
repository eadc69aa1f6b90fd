"""Training checkpoints: atomic, never unpickled, and the last good one always survives.

Layout under ``<output>/checkpoints/``::

    step-00000040/                 one complete checkpoint
        model.safetensors          trained weights (after the flush of pending updates)
        optimizer.safetensors      tensors of the plugin state (may be empty)
        state.json                 trainer + optimizer JSON state; written last inside the folder
    latest                         the name of the newest complete checkpoint

A checkpoint of *updates* (``state.json`` key ``"weights": "updates"``) has no
``model.safetensors``: its state holds the log of every update since the base
store instead, replayed onto the store on resume (:mod:`zoedge.train.update_log`).

A checkpoint is written into ``.tmp-step-N``, every file fsynced, then the
folder is renamed and ``latest`` replaced atomically. A SIGKILL at any moment
leaves either the old ``latest`` (pointing at a complete folder) or the new
one; re-saving an existing step exchanges the folders
(:func:`zoedge.output_dir.replace_dir`), so the old copy or the new one is
always there. ``state.json`` records the sha256 of both tensor files (key
``"checksums"``); a checkpoint is *intact* when its files exist, match their
checksums and its state has the keys in :data:`REQUIRED_STATE`.
:func:`latest_checkpoint` returns the newest intact one: when ``latest`` is
truncated or damaged it falls back to the previous checkpoint, with a warning.
Non-finite weights are never written (:func:`save_checkpoint` refuses them).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zoedge.errors import StoreError, TrainingError
from zoedge.output_dir import aside, replace_dir, restore_aside
from zoedge.store.safetensors_io import WeightStream, write_streamed

log = logging.getLogger(__name__)

LATEST = "latest"
TENSOR_KEY = "__tensor__"
CHECKSUMS = "checksums"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
#: state.json key of the checkpoint's kind: absent for full weights, UPDATES for a checkpoint of updates
WEIGHTS = "weights"
UPDATES = "updates"
#: keys every checkpoint's state.json holds (written by the trainer)
REQUIRED_STATE = ("step", "optimizer", "scheduler")


def split_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace tensors inside nested dicts/lists by ``{"__tensor__": key}``; return (json-able, tensors)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            tensors[path] = o.detach().contiguous().cpu()
            return {TENSOR_KEY: path}
        if isinstance(o, dict):
            return {k: walk(v, f"{path}/{k}") for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(o)]
        return o

    return walk(obj, prefix), tensors


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {TENSOR_KEY}:
            return tensors[obj[TENSOR_KEY]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(root: Path, step: int, weights: Mapping[str, torch.Tensor] | WeightStream | None,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    Args:
        root: ``<output>/checkpoints``.
        step: completed steps.
        weights: tensor name -> CPU tensor (tied aliases are dropped: safetensors refuses shared storage), or a
            :class:`~zoedge.store.safetensors_io.WeightStream` (a streamed model's blocks one at a time, so a
            model larger than memory is checkpointed holding one block); None: a checkpoint of updates (no
            ``model.safetensors``; ``state`` holds what rebuilds the weights).
        state: JSON-able dict; tensors anywhere inside go to ``optimizer.safetensors``.

    Raises:
        TrainingError: a weight or state tensor is NaN or infinite (nothing is written).
        StoreError: the checkpoint cannot be written (disk full, permissions); the temporary folder is
            removed and the previous checkpoint is intact.
    """
    name = f"step-{step:08d}"
    json_state, tensors = split_tensors(state)
    if weights is None:
        json_state[WEIGHTS] = UPDATES
    files = _tensor_files(json_state)
    stream = None if weights is None else weights if isinstance(weights, WeightStream) else WeightStream.of(weights)
    check_finite_weights(tensors, f"checkpoint {name} (optimizer state)", root)
    tmp, final = root / f".tmp-{name}", root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a kill; one writer per run (its lock)
            shutil.rmtree(stale, ignore_errors=True)
        for old in root.glob(".old-step-*"):
            restore_aside(root / old.name[len(".old-"):])
        tmp.mkdir()
        # each chunk is checked before it is written; a non-finite one stops the write and the folder goes
        if stream is not None:
            write_streamed(tmp / "model.safetensors", stream,
                           check=lambda chunk: check_finite_weights(chunk, f"checkpoint {name}", root))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        json_state = {**json_state, CHECKSUMS: {f: _sha256(tmp / f) for f in files}}
        (tmp / "state.json").write_text(json.dumps(json_state, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # a re-saved step: exchanged, never deleted first
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(name)
        _fsync_file(latest_tmp)
        os.replace(latest_tmp, root / LATEST)
        _fsync_dir(root)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        previous = latest_checkpoint(root)
        raise StoreError(root, f"cannot write checkpoint {name} ({reason})",
                         "free disk space or fix permissions, then " +
                         (f"re-run with --resume; the previous checkpoint {previous.name} is intact" if previous else
                          "run the command again (there is no earlier checkpoint: the run starts over)")) from None
    except BaseException:  # e.g. a non-finite block found halfway: nothing of this checkpoint is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def free_disk(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _tensor_files(state: Mapping[str, Any]) -> tuple[str, ...]:
    """The tensor files a checkpoint with this state has."""
    return ("optimizer.safetensors",) if state.get(WEIGHTS) == UPDATES else TENSOR_FILES


def verify_checkpoint(path: Path) -> None:
    """Check that ``path`` is an intact checkpoint (files present, checksums match, state keys present).

    Raises:
        StoreError: naming the folder and what is wrong.
    """
    fix = "delete this folder to resume from the previous checkpoint, or start without --resume"
    if not (path / "state.json").is_file():
        raise StoreError(path, "incomplete checkpoint (missing state.json)", fix)
    state = _read_state(path)
    files = _tensor_files(state)
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise StoreError(path, f"incomplete checkpoint (missing {', '.join(missing)})", fix)
    for f, digest in (state.get(CHECKSUMS) or {}).items():
        if f in files and _sha256(path / f) != digest:
            raise StoreError(path / f, "does not match the checksum recorded in state.json (truncated or damaged)",
                             fix)


def _read_state(path: Path) -> dict[str, Any]:
    fix = "delete this folder to resume from the previous checkpoint, or start without --resume"
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise StoreError(path / "state.json", f"is unreadable ({e})", fix) from None
    if not isinstance(state, dict):
        raise StoreError(path / "state.json", "does not hold a JSON object", fix)
    missing = [k for k in REQUIRED_STATE if k not in state]
    if missing:
        raise StoreError(path / "state.json", f"lacks the keys {missing}", fix)
    return state


def checkpoint_folders(root: Path) -> list[Path]:
    """Every ``step-*`` folder under ``root``, oldest first (a step whose re-save was killed between its two
    renames: the old copy, kept aside)."""
    if not root.is_dir():
        return []
    found = {p.name: p for p in root.glob("step-*") if p.is_dir()}
    for p in root.glob(".old-step-*"):
        name = p.name[len(".old-"):]
        if p.is_dir() and name not in found and aside(root / name) == p:
            found[name] = p
    return [found[k] for k in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint folder (``latest`` first, then by step), or None.

    A damaged newest checkpoint is skipped with a warning (see the module docstring).
    """
    pointer = root / LATEST
    candidates = checkpoint_folders(root)[::-1]
    if pointer.is_file():
        try:
            named = root / pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named is not None and named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for cand in candidates:
        try:
            verify_checkpoint(cand)
        except StoreError as e:
            log.warning("skipping checkpoint %s: %s", cand, e.problem)
            continue
        return cand
    return None


class LazyWeights(Mapping[str, torch.Tensor]):
    """A checkpoint's weights, each read from its file when looked up (a model larger than memory is restored
    one tensor at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except (OSError, ValueError, SafetensorError) as e:
            raise StoreError(self.path, f"unreadable tensor {key} ({e})", "delete this folder to resume from the "
                             "previous checkpoint, or start without --resume") from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load_checkpoint(path: Path) -> tuple[Mapping[str, torch.Tensor] | None, dict[str, Any]]:
    """Read (weights, state) from a checkpoint folder; the weights are read lazily (:class:`LazyWeights`), None
    for a checkpoint of updates.

    Raises:
        StoreError: files missing, unreadable or not matching their checksums (names the file and what to do).
    """
    verify_checkpoint(path)
    state = _read_state(path)
    try:
        weights = None if state.get(WEIGHTS) == UPDATES else LazyWeights(path / "model.safetensors")
        tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise StoreError(path, f"unreadable checkpoint ({e})",
                         "delete this folder to resume from the previous checkpoint, or start without --resume") from None
    state.pop(CHECKSUMS, None)
    return weights, join_tensors(state, tensors)


def last_good(ckpt_dir: Path | None) -> str:
    """Text naming the newest intact checkpoint (for error messages)."""
    path = latest_checkpoint(ckpt_dir) if ckpt_dir is not None and ckpt_dir.is_dir() else None
    if path is None:
        return "no checkpoint has been written, and nothing was saved or exported"
    return f"the last good checkpoint is {path} (continue from it with --resume, e.g. with a lower --lr)"


def check_finite_weights(weights: Mapping[str, torch.Tensor], what: str, ckpt_dir: Path | None) -> None:
    """Refuse to write ``weights`` when any is NaN or infinite.

    Raises:
        TrainingError: naming the first bad tensor, ``what`` was not written, and the last good checkpoint.
    """
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TrainingError(what, f"tensor {name} holds NaN or infinite values; it was not written",
                                f"lower --lr or --eps; {last_good(ckpt_dir)}")
