"""Training checkpoints: atomic, never unpickled, and the last good one always survives.

Layout under ``<output>/checkpoints/``::

    step-00000040/                 one complete checkpoint
        model.safetensors          trained weights (after the flush of pending updates)
        optimizer.safetensors      tensors of the plugin state (may be empty)
        state.json                 trainer + optimizer JSON state; written last inside the folder
    latest                         the name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step-N``, every file fsynced, then the
folder is renamed and ``latest`` replaced atomically. A SIGKILL at any moment
leaves either the old ``latest`` (pointing at a complete folder) or the new
one. Loading falls back to the newest complete folder if ``latest`` is bad.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from zoedge.errors import StoreError

LATEST = "latest"
TENSOR_KEY = "__tensor__"


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


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    Args:
        root: ``<output>/checkpoints``.
        step: completed steps.
        weights: tensor name -> CPU tensor (tied aliases are dropped: safetensors refuses shared storage).
        state: JSON-able dict; tensors anywhere inside go to ``optimizer.safetensors``.

    Raises:
        StoreError: the checkpoint cannot be written (disk full, permissions); the previous one is intact.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        unique: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in weights.items():  # drop tied aliases (same storage)
            if v.data_ptr() not in seen or v.numel() == 0:
                seen.add(v.data_ptr())
                unique[k] = v.contiguous()
        save_file(unique, str(tmp / "model.safetensors"))
        json_state, tensors = split_tensors(state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(json_state, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(name)
        _fsync_file(latest_tmp)
        os.replace(latest_tmp, root / LATEST)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(root, f"cannot write checkpoint {name} ({e.strerror})",
                         "free disk space or fix permissions; the previous checkpoint is intact") from None
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("model.safetensors", "optimizer.safetensors", "state.json"))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if cand.is_dir() and _complete(cand):
            return cand
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and _complete(p))
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (weights, state) from a checkpoint folder.

    Raises:
        StoreError: files missing or unreadable (names the file and what to do).
    """
    try:
        weights = load_file(str(path / "model.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise StoreError(path, f"unreadable checkpoint ({e})",
                         "delete this folder to resume from the previous checkpoint, or start without --resume") from None
    return weights, join_tensors(state, tensors)
