"""Nothing lost, nothing misrecorded (issue 19, defects 1, 2, 4, 7): zoedge removes only what it wrote and never
writes into an input; checkpoints are bound to their store and data; dev/test are disjoint from train by content;
re-saves and SIGTERM leave the old state or the new one. Every test here fails on the code before the fix."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import zoedge
import zoedge.output_dir as od
from zoedge.cli import main
from zoedge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from zoedge.train.sampling import content_key
from zoedge.train.tasks import load_jsonl
from tests.test_cli_finetune import setup  # noqa: F401  (fixture: tiny Llama HF dir + train.jsonl + base args)


def threads1(setup):
    tmp, model, base = setup
    return tmp, model, base + ["--threads", "1"]


def with_model(base, model):
    i = base.index("--model")
    return base[:i + 1] + [str(model)] + base[i + 2:]


def weights(path):
    return load_file(str(path))


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ 1: the output-directory contract
def test_output_holding_the_model_is_refused_and_nothing_is_deleted(setup, capsys):
    """`--model model --output .` used to delete the source model, then fail with "model does not exist"."""
    tmp, _, base = threads1(setup)
    proj = tmp / "proj"
    shutil.copytree(tmp / "hf", proj / "model")
    before = sorted(p.name for p in (proj / "model").iterdir())
    for out in (proj, proj / "model", proj / "model" / "run", tmp / "link-to-proj"):
        if out.name == "link-to-proj":
            out.symlink_to(proj, target_is_directory=True)
        assert main(with_model(base, proj / "model") + ["--steps", "1", "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--output" in err and "--model" in err, err
    assert sorted(p.name for p in (proj / "model").iterdir()) == before
    assert not (proj / ".zoedge-run").exists() and not (proj / "model" / "run").exists()


def test_metrics_aliasing_an_input_is_refused(setup, capsys):
    """`--metrics` at the training file used to delete it; a hard link or a `..` path is the same file."""
    tmp, _, base = threads1(setup)
    text = (tmp / "train.jsonl").read_text()
    os.link(tmp / "train.jsonl", tmp / "hardlink.jsonl")
    for metrics in (tmp / "train.jsonl", tmp / "hf" / ".." / "train.jsonl", tmp / "hardlink.jsonl",
                    tmp / "hf" / "metrics.jsonl"):
        assert main(base + ["--steps", "1", "--output", str(tmp / "run"), "--metrics", str(metrics)]) == 2
        assert "--metrics" in capsys.readouterr().err
    assert (tmp / "train.jsonl").read_text() == text and not (tmp / "hf" / "metrics.jsonl").exists()
    # nor one of the run's own files, nor a run inside another run's folder
    assert main(base + ["--steps", "1", "--no-plot", "--output", str(tmp / "run")]) == 0
    capsys.readouterr()
    for extra in (["--output", str(tmp / "run2"), "--metrics", str(tmp / "run2" / "summary.json")],
                  ["--output", str(tmp / "run" / "model" / "inner")]):
        assert main(base + ["--steps", "1"] + extra) == 2
        assert ("--metrics" if "--metrics" in extra else "inside model of the zoedge run") in capsys.readouterr().err
    assert not (tmp / "run" / "model" / "inner").exists()
    # eval's --json too
    assert main(["eval", "--model", str(tmp / "hf"), "--train", str(tmp / "train.jsonl"), "--no-progress",
                 "--json", str(tmp / "train.jsonl")]) == 2
    assert "--json" in capsys.readouterr().err and (tmp / "train.jsonl").read_text() == text
    assert main(["generate", "--model", str(tmp / "hf"), "--prompt", "hi", "--json", str(tmp / "hf" / "out.json")]) == 2
    assert "--json" in capsys.readouterr().err and not (tmp / "hf" / "out.json").exists()


def test_non_empty_folder_that_is_not_a_run_is_refused(setup, capsys):
    tmp, _, base = threads1(setup)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "summary.json").write_text("my own file")
    (tmp / "mine" / "model").mkdir()
    assert main(base + ["--steps", "1", "--output", str(tmp / "mine")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp / "mine" / "summary.json").read_text() == "my own file" and (tmp / "mine" / "model").is_dir()


def test_fresh_run_removes_only_what_zoedge_wrote(setup, capsys):
    tmp, _, base = threads1(setup)
    out, ext = tmp / "run", tmp / "ext.jsonl"
    args = base + ["--steps", "1", "--no-plot", "--output", str(out)]
    assert main(args + ["--metrics", str(ext)]) == 0
    assert (out / od.MARKER).is_file() and ext.is_file()
    shutil.rmtree(out / "checkpoints")  # a run killed before its first checkpoint
    (out / "notes.txt").write_text("keep me")
    (tmp / "other.jsonl").write_text("someone else's\n")
    assert main(args + ["--metrics", str(tmp / "other.jsonl")]) == 2  # not this run's file
    assert "was not written by this run" in capsys.readouterr().err
    assert (tmp / "other.jsonl").read_text() == "someone else's\n"
    assert main(args + ["--metrics", str(ext)]) == 0  # the run's own metrics file is replaced
    assert (out / "notes.txt").read_text() == "keep me"
    assert [json.loads(line)["step"] for line in ext.read_text().splitlines()] == [1]


# ------------------------------------------------------------------------------ 2: checkpoints bound to store/data
def test_resume_on_a_re_prepared_store_is_refused(setup, capsys):
    """Re-preparing the store with other options used to resume silently (exit 0) and overwrite the trained
    checkpoint with untrained values."""
    tmp, _, base = threads1(setup)
    store, out = tmp / "store", tmp / "run"
    zoedge.prepare(tmp / "hf", store, progress=False, log=lambda s: None)
    args = with_model(base, store) + ["--steps", "2", "--save-every", "1", "--output", str(out)]
    assert main(args) == 0
    trained = weights(out / "checkpoints" / "step-00000002" / "model.safetensors")
    shutil.rmtree(store)
    zoedge.prepare(tmp / "hf", store, dtype="bf16", progress=False, log=lambda s: None)
    assert main(args + ["--resume"]) == 2  # the store's dtype is the run's: a changed setting
    assert "--dtype bf16 but the run used --dtype fp32" in capsys.readouterr().err
    assert main(args + ["--resume", "--allow-changes"]) == 2  # which --allow-changes does not cover
    err = capsys.readouterr().err
    assert "not the store" in err and "dtype bf16 (the checkpoint was made on fp32)" in err, err
    assert equal(weights(out / "checkpoints" / "step-00000002" / "model.safetensors"), trained)
    # a byte-equal re-prepare is the same store
    shutil.rmtree(store)
    zoedge.prepare(tmp / "hf", store, progress=False, log=lambda s: None)
    assert main(with_model(base, store) + ["--steps", "3", "--output", str(out), "--resume"]) == 0


def test_resume_with_changed_data_is_refused(setup, capsys):
    tmp, _, base = threads1(setup)
    out = tmp / "run"
    assert main(base + ["--steps", "1", "--no-plot", "--output", str(out)]) == 0
    rows = (tmp / "train.jsonl").read_text().splitlines()
    (tmp / "train.jsonl").write_text("\n".join(rows[::-1]))
    for extra in ([], ["--allow-changes"]):
        assert main(base + ["--steps", "2", "--output", str(out), "--resume"] + extra) == 2
        err = capsys.readouterr().err
        assert "--train" in err and "data differ" in err, err


def test_resume_without_run_json_checks_the_checkpoints_record(setup, capsys):
    tmp, _, base = threads1(setup)
    out = tmp / "run"
    assert main(base + ["--steps", "1", "--no-plot", "--output", str(out)]) == 0
    (out / "run.json").unlink()
    assert main(base + ["--steps", "2", "--output", str(out), "--resume", "--seed", "7"]) == 2
    assert "--seed 7 but the run used --seed 0" in capsys.readouterr().err
    assert main(base + ["--steps", "2", "--no-plot", "--output", str(out), "--resume"]) == 0


def test_resume_with_no_checkpoint_is_an_error_and_keeps_the_export(setup, capsys):
    tmp, _, base = threads1(setup)
    out = tmp / "run"
    assert main(base + ["--steps", "1", "--no-plot", "--output", str(out)]) == 0
    model = weights(out / "model" / "model.safetensors")
    shutil.rmtree(out / "checkpoints")
    assert main(base + ["--steps", "2", "--output", str(out), "--resume"]) == 2
    assert "holds no checkpoint to resume" in capsys.readouterr().err
    assert equal(weights(out / "model" / "model.safetensors"), model)


def test_allowed_change_after_a_resume_is_measured_against_the_checkpoint(setup):
    """run.json said lr 2e-3 after a resume that was killed before its first checkpoint; the checkpoint (lr
    1e-3) is what is resumed, so a later resume with 2e-3 must apply the change, not record it unused."""
    tmp, _, base = threads1(setup)
    out = tmp / "run"
    assert main(base + ["--steps", "1", "--no-plot", "--output", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    record["settings"]["options"]["lr"] = 0.002  # what the killed resume wrote
    (out / "run.json").write_text(json.dumps(record))
    changed = [a if a != "1e-3" else "2e-3" for a in base]
    assert main(changed + ["--steps", "2", "--no-plot", "--output", str(out), "--resume", "--allow-changes"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == [0.001, 0.002]


# ------------------------------------------------------------------------------------ 4: splits disjoint by content
def test_dev_and_test_never_hold_a_training_example(setup, monkeypatch, capsys):
    """`--dev` and `--test` set to the training file used to be accepted with 3/8 and 5/8 overlap."""
    tmp, _, base = threads1(setup)
    out = tmp / "run"
    train = str(tmp / "train.jsonl")
    captured = []
    from zoedge.train.data import RawData  # the data's split, carved before the model loads
    real = RawData.splits
    monkeypatch.setattr(RawData, "splits", lambda self, d, tok: captured.append(real(self, d, tok)) or captured[-1])
    assert main(base + ["--steps", "1", "--no-plot", "--output", str(out), "--dev", train, "--test", train]) == 0
    splits = captured[0]
    trained = {content_key(e) for e in splits.train}
    assert splits.dev and splits.test
    assert not trained & {content_key(e) for e in splits.dev + splits.test}
    summary = json.loads((out / "summary.json").read_text())
    dropped = summary["data"]["dropped_as_in_train"]
    assert dropped["dev"] + summary["data"]["dev"] == 8 and dropped["dev"] > 0
    assert dropped["test"] + summary["data"]["test"] == 8 and dropped["test"] > 0
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--no-progress"]) == 0  # the same disjoint split


def test_near_duplicates_count_as_the_same_example(setup, capsys):
    tmp, _, base = threads1(setup)
    rows = [json.loads(line) for line in (tmp / "train.jsonl").read_text().splitlines()]
    # every training row, re-spaced and re-cased: all of dev would be training examples
    (tmp / "dev.jsonl").write_text("\n".join(json.dumps({**r, "sentence": "  " + r["sentence"].upper().replace(
        " ", "   ")}) for r in rows))
    assert main(base + ["--steps", "1", "--n-train", "60", "--n-test", "0", "--output", str(tmp / "run"),
                        "--dev", str(tmp / "dev.jsonl")]) == 2
    assert "dev data: all 8 of its examples are also in the training split" in capsys.readouterr().err
    ex = load_jsonl(tmp / "dev.jsonl")
    assert content_key(ex[0]) == content_key(load_jsonl(tmp / "train.jsonl")[0])


# ------------------------------------------------------------------------------------------------- 7: atomicity
class Killed(BaseException):
    """Stands for SIGKILL at one moment."""


@pytest.mark.parametrize("exchange", [True, False])
def test_resaving_a_step_survives_a_kill_at_every_moment(tmp_path, monkeypatch, exchange):
    """Re-saving step 1 used to delete the old folder before renaming the new one in: a kill between the two left
    no checkpoint at all."""
    old, new = {"a": torch.zeros(3)}, {"a": torch.ones(3)}
    state = {"step": 1, "optimizer": {}, "scheduler": {}}
    if not exchange:
        monkeypatch.setattr(od, "_exchange", lambda a, b: False)
    moments = 0
    for kill_at in range(1, 30):
        root = tmp_path / f"k{kill_at}"
        save_checkpoint(root, 1, old, state)
        calls = 0

        def counted(fn):
            def wrapper(*a, **k):
                nonlocal calls
                calls += 1
                if calls == kill_at:
                    raise Killed()
                return fn(*a, **k)
            return wrapper
        with monkeypatch.context() as m:
            for mod in (os, shutil):
                for name in ("replace", "rename", "rmtree"):
                    if hasattr(mod, name):
                        m.setattr(mod, name, counted(getattr(mod, name)))
            m.setattr(od, "_exchange", counted(od._exchange))
            try:
                save_checkpoint(root, 1, new, state)
                finished = True
            except Killed:
                finished = False
        found = latest_checkpoint(root)
        assert found is not None, f"kill at file-system call {kill_at}: no checkpoint left"
        got = load_checkpoint(found)[0]["a"]
        assert torch.equal(got, old["a"]) or torch.equal(got, new["a"])
        save_checkpoint(root, 1, new, state)  # the next save cleans up and lands the new one
        assert torch.equal(load_checkpoint(latest_checkpoint(root))[0]["a"], new["a"])
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
        moments += 1
        if finished:
            break
    assert moments > 3


def test_sigterm_during_export_is_clean_and_resumable(setup, monkeypatch, capsys):
    """SIGTERM during the export used to kill the process (model.tmp left, eval: "has no tokenizer")."""
    from zoedge.store import safetensors_io

    tmp, _, base = threads1(setup)
    args = base + ["--steps", "2", "--no-plot"]
    assert main(args + ["--output", str(tmp / "straight")]) == 0

    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM was not handled by zoedge")
    previous = signal.signal(signal.SIGTERM, unhandled)
    real = safetensors_io.write_streamed
    model_writes = []

    def term_in_export(path, *a, **k):
        if path.parent.name == "model.tmp":
            model_writes.append(path)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, *a, **k)
    monkeypatch.setattr(safetensors_io, "write_streamed", term_in_export)
    out = tmp / "run"
    try:
        code = main(args + ["--output", str(out)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert model_writes and code == 143, err
    assert "SIGTERM" in err and "--resume" in err
    assert not (out / "model.tmp").exists() and not (out / "model").exists()
    assert latest_checkpoint(out / "checkpoints").name == "step-00000002"
    assert main(["eval", "--model", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unfinished" in err and "--resume" in err and "tokenizer" not in err
    monkeypatch.setattr(safetensors_io, "write_streamed", real)
    assert main(args + ["--output", str(out), "--resume"]) == 0
    assert equal(weights(out / "model" / "model.safetensors"), weights(tmp / "straight" / "model" / "model.safetensors"))

