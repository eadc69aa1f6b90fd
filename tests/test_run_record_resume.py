"""What a resume checks and changes, driven directly (zoedge/train/run_record.py): the pid of the run holding an
--output; the store and data a checkpoint was made on (each difference named); which changed settings alter what
a logged update means (plugin options, the seed); and --allow-changes applying exactly the changed options."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from zoedge.errors import ConfigError, StoreError
from zoedge.train.run_record import (IDENTITY, OutputLock, _check_data, apply_resumed_changes, check_store,
                                     running_pid, update_meaning_changes)
from zoedge_plugins.mezo import MeZO


def test_the_running_pid_is_read_from_the_lock(tmp_path):
    out = tmp_path / "run"
    with OutputLock(out):
        assert running_pid(out) == str(os.getpid())
        with pytest.raises(ConfigError, match=f"in use by another zoedge finetune \\(pid {os.getpid()}\\)"):
            OutputLock(out).__enter__()
    assert running_pid(out) is None


STORE = {"path": "/s/a", "content_sha256": "aa", "dtype": "fp32", "quant": "none", "layout": {"blocks": ["x"]}}


def checkpoint(tmp_path, store):
    (tmp_path / "state.json").write_text(json.dumps({"step": 3, IDENTITY: {"store": store}}))
    return tmp_path


@pytest.mark.parametrize("other,words", [(dict(content_sha256="bb"), "other weights (its blocks' digests differ)"),
                                         (dict(content_sha256="bb", dtype="fp16"),
                                          "dtype fp16 (the checkpoint was made on fp32)")])
def test_another_store_is_refused_naming_what_differs(tmp_path, other, words):
    check_store(checkpoint(tmp_path, STORE), dict(STORE))  # its own store: fine
    with pytest.raises(StoreError) as info:
        check_store(checkpoint(tmp_path, STORE), {**STORE, **other})
    assert words in str(info.value) and "fp32 (the" not in str(info.value).replace(words, "")


def test_changed_or_added_data_is_refused(tmp_path):
    train = {"path": "t.jsonl", "sha256": "1" * 64}
    _check_data(tmp_path, {"train": train}, {"train": dict(train)})  # the same data: fine
    with pytest.raises(ConfigError, match="--dev"):  # a split the checkpointed run did not have
        _check_data(tmp_path, {"train": train}, {"train": dict(train), "dev": {"path": "d", "sha256": "2" * 64}})
    with pytest.raises(ConfigError, match="--train"):
        _check_data(tmp_path, {"train": train}, {"train": {"path": "t.jsonl", "sha256": "3" * 64}})


def test_which_changes_alter_the_meaning_of_an_update():
    record = {"resumes": [{"changed": {"opt q": [1, 2], "seed": [0, 7], "steps": [10, 20], "batch_size": [4, 8]}}]}
    assert update_meaning_changes(record) == ["--opt q=2", "--seed 7"]


def trainer():
    opt = MeZO(seed=0, lr=0.5, eps=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)
    return SimpleNamespace(opt=opt, scheduler=sched)


def test_allowed_changes_take_effect_and_nothing_else():
    t = trainer()
    group, options, s = t.opt.param_groups[0], {"lr": 0.9, "weight_decay": 0.1}, SimpleNamespace(seed=7)
    apply_resumed_changes(t, {"resumes": [{"changed": {"opt weight_decay": [0.0, 0.1]}}]}, s, options)
    assert (group["weight_decay"], group["lr"], t.scheduler.base_lrs, t.opt.seed) == (0.1, 0.25, [0.5], 0)
    apply_resumed_changes(t, {"resumes": [{"changed": {"opt lr": [0.5, 0.9]}}]}, s, {"lr": 0.9, "weight_decay": 0.2})
    assert t.scheduler.base_lrs == [0.9] and group["lr"] == pytest.approx(0.45)  # at the schedule's factor
    assert (group["weight_decay"], t.opt.seed) == (0.1, 0)
    apply_resumed_changes(t, {"resumes": [{"changed": {"seed": [0, 7]}}]}, s, {"lr": 0.9, "weight_decay": 0.2})
    assert t.opt.seed == 7 and group["weight_decay"] == 0.1


def test_resume_without_run_json_uses_the_checkpoints_record(tmp_path):
    """run.json lost (or never written by this output): the checkpoint's own record of the settings is enough; with
    neither, the resume is refused."""
    from zoedge.settings import FinetuneSettings
    from zoedge.train.run_record import RECORD, reconcile, run_defining
    s, out = FinetuneSettings(), tmp_path / "out"
    out.mkdir()
    ckpt = tmp_path / "step-00000003"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"step": 3, IDENTITY: {"settings": run_defining(s, {})}}))
    record = reconcile(out, s, {}, ckpt)
    assert record["resumes"] == [{"step": 3, "changed": {}}] and (out / RECORD).is_file()
    bare = tmp_path / "step-00000004"
    bare.mkdir()
    (bare / "state.json").write_text(json.dumps({"step": 4}))
    (out / RECORD).unlink()
    with pytest.raises(ConfigError, match="records the run's settings"):
        reconcile(out, s, {}, bare)
