"""Which checkpoint a resume picks and which ones a save keeps, driven directly (zoedge/train/checkpoint.py): the
newest ``keep`` (default 2) survive a save; ``latest`` names the one to try first, then the others newest first; a
step whose re-save was killed between its two renames is found under its aside name; the weights read back lazily
know their size; errors name the last good checkpoint, or say there is none."""
from __future__ import annotations

import shutil

import pytest
import torch

from zoedge.train import checkpoint as ck
from zoedge.train.checkpoint import (LATEST, checkpoint_folders, free_disk, last_good, latest_checkpoint,
                                     load_checkpoint, save_checkpoint)


def save(root, step, **kw):
    return save_checkpoint(root, step, {"a": torch.full((2,), float(step)), "b": torch.zeros(3)},
                           {"step": step, "optimizer": {}, "scheduler": {}}, **kw)


def names(paths):
    return [p.name for p in paths]


def test_a_save_keeps_the_newest_two_by_default(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    assert names(checkpoint_folders(tmp_path)) == ["step-00000002", "step-00000003"]
    save(tmp_path, 4, keep=3)
    assert names(checkpoint_folders(tmp_path)) == ["step-00000002", "step-00000003", "step-00000004"]


def test_re_saving_an_older_step_keeps_it(tmp_path):
    """A resume from step 1 that saves step 2 again, with 3 and 4 on disk: the step just written survives."""
    for step in (1, 2, 3):
        save(tmp_path, step, keep=5)
    final = save(tmp_path, 2, keep=1)
    assert final.is_dir() and names(checkpoint_folders(tmp_path)) == ["step-00000002", "step-00000003"]


def test_newest_first_without_a_pointer(tmp_path):
    for step in (1, 2):
        save(tmp_path, step)
    (tmp_path / LATEST).unlink()
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_the_pointer_goes_first_and_a_stale_one_is_ignored(tmp_path):
    for step in (1, 2):
        save(tmp_path, step)
    (tmp_path / LATEST).write_text("step-00000001\n")
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    (tmp_path / LATEST).write_text("step-00000009\n")  # names a folder that is gone
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_a_step_kept_aside_by_a_killed_re_save_is_found(tmp_path):
    for step in (1, 2):
        save(tmp_path, step)
    (tmp_path / "step-00000002").rename(tmp_path / ".old-step-00000002")  # killed between the two renames
    assert names(checkpoint_folders(tmp_path)) == ["step-00000001", ".old-step-00000002"]
    assert latest_checkpoint(tmp_path).name == ".old-step-00000002"
    shutil.copytree(tmp_path / ".old-step-00000002", tmp_path / "step-00000002")  # both: the real name wins
    assert names(checkpoint_folders(tmp_path)) == ["step-00000001", "step-00000002"]


def test_lazy_weights_know_their_tensors(tmp_path):
    weights, state = load_checkpoint(save(tmp_path, 5))
    assert len(weights) == 2 and sorted(weights) == ["a", "b"] and state["step"] == 5
    assert torch.equal(weights["a"], torch.full((2,), 5.0))


def test_last_good_names_the_checkpoint_or_says_there_is_none(tmp_path):
    assert last_good(None).startswith("no checkpoint has been written")
    assert last_good(tmp_path).startswith("no checkpoint has been written")
    save(tmp_path, 3)
    assert "step-00000003" in last_good(tmp_path)


def test_free_disk_asks_the_nearest_existing_folder(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: asked.append(p) or shutil._ntuple_diskusage(9, 0, 7))
    assert free_disk(tmp_path / "not" / "yet") == 7
    assert free_disk(tmp_path) == 7
    assert asked == [tmp_path, tmp_path]
