"""Numbers a user can trust (issue 6, training side): splits, divergence, stale working copies, resume, locks,
clean errors. Every test here fails on the code before the fix."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import zoedge.train.job as job
from zoedge.cli import build_parser, main
from zoedge.errors import StoreError, TrainingError
from zoedge.train import checkpoint as ck
from zoedge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from zoedge.train.guard import STALL_STEPS, StepGuard
from zoedge.train.run_record import OutputLock
from tests.test_cli_finetune import setup  # noqa: F401  (fixture: tiny Llama HF dir + train.jsonl + base args)


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def metrics_steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def no_model_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the bad option was found")
    monkeypatch.setattr(job, "resolve_store", fail)


# --------------------------------------------------------------------------------------------------- 3: splits
def test_eval_carves_the_finetune_split(setup, monkeypatch, capsys):
    """With default options, eval's dev/test are the run's dev/test, never its training examples."""
    tmp, _, base = setup
    carved = []
    import zoedge.train.data as data  # where the split is carved (before the model loads)
    real_split = data.split
    monkeypatch.setattr(data, "split", lambda *a, **k: carved.append(real_split(*a, **k)) or carved[-1])
    args = [a for a in base if a not in ("--n-train", "40", "--n-dev", "8", "--n-test", "8")]
    out = tmp / "run"
    assert main(args + ["--steps", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "model"), "--train", str(tmp / "train.jsonl"), "--no-progress"]) == 0
    ft, ev = carved
    assert not {e.prompt for e in ev.dev + ev.test} & {e.prompt for e in ft.train}
    assert (ev.dev, ev.test) == (ft.dev, ft.test)
    res = strict_json(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert res["split"]["dev"] == summary["split"]["dev"] and summary["split"]["train"]["size"] == len(ft.train)


def test_eval_refuses_a_split_that_differs_from_the_run(setup, capsys):
    tmp, _, base = setup
    out = tmp / "run"
    assert main(base + ["--steps", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--n-test", "20", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--n-test 20 (the run used 8)" in err and "--other-split" in err
    # the data file changed since the run: same options, other examples
    rows = (tmp / "train.jsonl").read_text().splitlines()
    (tmp / "train.jsonl").write_text("\n".join(rows[::-1]))
    assert main(["eval", "--model", str(out), "--no-progress"]) == 2
    assert "data files have changed" in capsys.readouterr().err
    assert main(["eval", "--model", str(out), "--no-progress", "--other-split"]) == 0


# ------------------------------------------------------------------------------------------------- 4: NaN guard
@pytest.mark.parametrize("opt, value", [("--lr", "inf"), ("--lr", "-1e-3"), ("--eps", "nan"),
                                        ("--weight-decay", "-0.1")])
def test_bad_hyperparameters_are_refused_at_the_start(setup, monkeypatch, capsys, opt, value):
    tmp, _, base = setup
    no_model_load(monkeypatch)
    args = [a for a in base if a not in ("--lr", "1e-3", "--eps", "1e-2")]
    assert main(args + ["--steps", "1", "--output", str(tmp / "bad"), opt, value]) == 2
    assert opt in capsys.readouterr().err


def test_divergence_never_writes_a_non_finite_checkpoint_or_model(setup, capsys):
    tmp, _, base = setup
    out = tmp / "run"
    args = [a for a in base if a not in ("--lr", "1e-3")]
    code = main(args + ["--lr", "1e300", "--steps", "3", "--save-every", "1", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 3 and "step" in err
    assert not (out / "model").exists()
    for folder in ck.checkpoint_folders(out / "checkpoints"):
        weights, _ = load_checkpoint(folder)
        assert all(torch.isfinite(w).all() for w in weights.values()), folder


def test_divergence_names_the_last_good_checkpoint_and_resume_works(setup, capsys):
    tmp, _, base = setup
    out = tmp / "run"
    assert main(base + ["--steps", "2", "--output", str(out)]) == 0
    args = [a for a in base if a not in ("--lr", "1e-3")]
    assert main(args + ["--lr", "1e300", "--steps", "4", "--output", str(out), "--resume", "--allow-changes"]) == 3
    err = capsys.readouterr().err
    assert "step-00000002" in err and "--resume" in err
    good = latest_checkpoint(out / "checkpoints")
    assert good.name == "step-00000002"
    assert main(base + ["--steps", "3", "--output", str(out), "--resume", "--allow-changes"]) == 0


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    save_checkpoint(tmp_path, 1, {"a": torch.ones(2)}, {"step": 1, "optimizer": {}, "scheduler": {}})
    with pytest.raises(TrainingError, match="checkpoint step-00000002: tensor a holds NaN.*step-00000001"):
        save_checkpoint(tmp_path, 2, {"a": torch.tensor([1.0, float("inf")])},
                        {"step": 2, "optimizer": {}, "scheduler": {}})
    assert [p.name for p in ck.checkpoint_folders(tmp_path)] == ["step-00000001"]


def test_guard_refuses_before_the_update_and_warns_on_stall():
    g = StepGuard(None, log=(lines := []).append)
    with pytest.raises(TrainingError, match="step 7.*non-finite loss"):
        g.check(7, [float("nan"), 0.5], {"projected_grad": float("nan")}, 1e-3)
    with pytest.raises(TrainingError, match="lr × projected gradient = 1e\\+300 × 0.5 overflows"):
        g.check(8, [0.7, 0.6], {"projected_grad": 0.5}, 1e300)
    for step in range(STALL_STEPS):
        g.check(step + 1, [0.6931, 0.6931], {"projected_grad": 0.0}, 1e30)
    assert len(lines) == 1 and "stalled" in lines[0] and "lower --lr" in lines[0]


# ----------------------------------------------------------------------------------------- 5: disk working copy
def test_fresh_disk_run_ignores_a_previous_working_copy(setup):
    tmp, _, base = setup
    args = base + ["--tier", "disk", "--steps", "2", "--no-plot"]
    assert main(args + ["--output", str(tmp / "a")]) == 0
    before = json.loads((tmp / "a" / "summary.json").read_text())["dev_before"]
    # a run killed before its first checkpoint: trained working copy, no checkpoint
    shutil.rmtree(tmp / "a" / "checkpoints")
    assert main(args + ["--output", str(tmp / "a")]) == 0
    assert json.loads((tmp / "a" / "summary.json").read_text())["dev_before"] == before


# ------------------------------------------------------------------------------------------------- 6: resume
def test_resume_refuses_changed_settings_unless_allowed(setup, capsys):
    tmp, _, base = setup
    out = tmp / "run"
    assert main(base + ["--steps", "2", "--output", str(out)]) == 0
    capsys.readouterr()
    for extra, text in ((["--seed", "5"], "--seed 5 but the run used --seed 0"),
                        (["--batch-size", "2"], "--batch-size 2 but the run used --batch-size 4")):
        assert main(base + ["--steps", "3", "--output", str(out), "--resume"] + extra) == 2
        err = capsys.readouterr().err
        assert text in err and "--allow-changes" in err
    changed = [a if a != "1e-3" else "2e-3" for a in base]
    assert main(changed + ["--steps", "3", "--output", str(out), "--resume"]) == 2
    assert "--lr 0.002 but the run used --lr 0.001" in capsys.readouterr().err
    assert main(changed + ["--steps", "3", "--output", str(out), "--resume", "--allow-changes"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumes"][-1] == {"step": 2, "changed": {"opt lr": [0.001, 0.002]}}
    assert summary["optimizer_state"]["lr"] == 0.002 and summary["settings"]["lr"] == 0.002
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == [0.001, 0.001, 0.002]


def test_truncated_latest_falls_back_and_resume_is_bit_equal(setup):
    """Kill-like damage to the newest checkpoint: resume from the previous one, metrics stay one line per step."""
    tmp, _, base = setup
    args = base + ["--steps", "4", "--save-every", "2", "--no-plot"]
    assert main(args + ["--output", str(tmp / "straight")]) == 0
    assert main(args + ["--output", str(tmp / "run")]) == 0
    latest = tmp / "run" / "checkpoints" / "step-00000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:-100])
    assert latest_checkpoint(tmp / "run" / "checkpoints").name == "step-00000002"
    assert main(args + ["--output", str(tmp / "run"), "--resume"]) == 0
    assert metrics_steps(tmp / "run") == [1, 2, 3, 4]
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert (summary["steps"], summary["start_step"]) == (4, 2)
    a = load_file(str(tmp / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp / "run" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- 7: lock
def test_second_run_on_one_output_is_refused(setup, monkeypatch, capsys):
    tmp, _, base = setup
    out = tmp / "run"
    no_model_load(monkeypatch)
    with OutputLock(out):
        assert main(base + ["--steps", "1", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "in use by another zoedge finetune" in err and f"pid {os.getpid()}" in err


# -------------------------------------------------------------------------------------------- 8: clean errors
def test_disk_full_during_checkpoint_is_a_clean_error(tmp_path, monkeypatch):
    w = {"a": torch.ones(4)}
    save_checkpoint(tmp_path, 1, w, {"step": 1, "optimizer": {}, "scheduler": {}})

    def full(tensors, path, *a, **k):
        open(path, "wb").write(b"\0" * 10)
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(StoreError, match="cannot write checkpoint step-00000002.*StorageFull"):
        save_checkpoint(tmp_path, 2, w, {"step": 2, "optimizer": {}, "scheduler": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    assert latest_checkpoint(tmp_path).name == "step-00000001"


def test_state_json_missing_keys(tmp_path):
    save_checkpoint(tmp_path, 1, {"a": torch.ones(2)}, {"step": 1, "optimizer": {}, "scheduler": {}})
    path = save_checkpoint(tmp_path, 2, {"a": torch.ones(2)}, {"step": 2, "optimizer": {}, "scheduler": {}})
    state = json.loads((path / "state.json").read_text())
    del state["optimizer"]
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(StoreError, match=r"state.json: lacks the keys \['optimizer'\]"):
        load_checkpoint(path)
    assert latest_checkpoint(tmp_path).name == "step-00000001"


@pytest.mark.parametrize("extra, text", [
    (["--device", "mps"], "--device: 'mps': zoedge streams blocks to cpu or cuda"),
    (["--device", "warp9"], "--device: 'warp9' is not a device name"),
    (["--n-train", "0"], "--n-train: 0 is too small. Fix: use a positive integer"),
    (["--n-train", "2"], "--n-train: 2 is smaller than --batch-size 4"),
    (["--metrics", "/nonexistent/dir/m.jsonl"], "--metrics: the directory of /nonexistent/dir/m.jsonl does not exist"),
])
def test_bad_options_are_refused_before_loading(setup, monkeypatch, capsys, extra, text):
    tmp, _, base = setup
    no_model_load(monkeypatch)
    assert main(base + ["--steps", "1", "--output", str(tmp / "o")] + extra) == 2
    assert text in capsys.readouterr().err


def test_output_that_is_a_file(setup, monkeypatch, capsys):
    tmp, _, base = setup
    no_model_load(monkeypatch)
    (tmp / "afile").write_text("x")
    assert main(base + ["--steps", "1", "--output", str(tmp / "afile")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_output_read_only(setup, monkeypatch, capsys):
    tmp, _, base = setup
    no_model_load(monkeypatch)
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    assert main(base + ["--steps", "1", "--output", str(tmp / "ro" / "run")]) == 2
    assert "--output" in capsys.readouterr().err


def test_eval_json_path_and_nan_output(setup, monkeypatch, capsys):
    tmp, model, _ = setup
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    model.save_pretrained(tmp / "nan")
    shutil.copy(tmp / "hf" / "tokenizer.json", tmp / "nan")
    shutil.copy(tmp / "hf" / "tokenizer_config.json", tmp / "nan")
    args = ["eval", "--model", str(tmp / "nan"), "--train", str(tmp / "train.jsonl"), "--n-dev", "4",
            "--n-test", "0", "--no-progress"]
    assert main(args + ["--json", str(tmp)]) == 2
    assert "--json" in capsys.readouterr().err
    # a model with a NaN weight gets no figures (issue 19): an error naming the weight, and no result file
    assert main(args + ["--json", str(tmp / "res.json")]) == 2
    err = capsys.readouterr().err
    assert "weights are not finite" in err and "model.layers.0.mlp.up_proj.weight" in err
    assert not (tmp / "res.json").exists()


def test_streamed_model_closed_when_training_fails(setup, monkeypatch):
    tmp, _, base = setup
    opened, closed = [], []

    class Counting(job.StreamedModel):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            opened.append(self)

        def close(self):
            closed.append(self)
            super().close()
    monkeypatch.setattr(job, "StreamedModel", Counting)
    args = [a for a in base if a not in ("--lr", "1e-3")]
    assert main(args + ["--lr", "1e300", "--steps", "3", "--output", str(tmp / "run")]) == 3
    assert opened and opened == closed


# ------------------------------------------------------------------------------------------ settings and help
def test_every_option_of_every_command_has_help():
    import argparse

    def check(p: argparse.ArgumentParser, where: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):  # explained by its choices' help lines
                for name, sub in action.choices.items():
                    assert any(c.dest == name and c.help for c in action._choices_actions), f"{where} {name}"
                    check(sub, f"{where} {name}")
            else:
                assert action.help and action.help.strip(), f"{where} {action.option_strings or action.dest}"

    parser, _ = build_parser()
    check(parser, "zoedge")


def test_finetune_and_eval_share_the_data_defaults():
    from zoedge.settings import DataOptions, EvalSettings, FinetuneSettings, from_args
    parser, _ = build_parser()
    ft, _ = from_args(FinetuneSettings, parser.parse_args(["finetune"]))
    ev, _ = from_args(EvalSettings, parser.parse_args(["eval"]))
    assert ft.data_settings() == ev.data_settings() == DataOptions().data_settings()


def test_summary_records_every_setting_and_the_curves(setup):
    from dataclasses import fields

    from zoedge.settings import FinetuneSettings
    tmp, _, base = setup
    out = tmp / "run"
    assert main(base + ["--steps", "2", "--eval-every", "1", "--output", str(out)]) == 0
    summary = strict_json((out / "summary.json").read_text())
    assert set(summary["settings"]) == {f.name for f in fields(FinetuneSettings)}
    assert summary["settings"]["n_dev"] == 8 and summary["settings"]["lr"] == 1e-3
    pytest.importorskip("matplotlib")
    assert summary["plot"] == str(out / "curves.png") and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------- evaluation without waste
def test_shared_prompt_rows_score_like_one_row_per_candidate(tmp_path):
    """Single-token candidates: one input row per example gives the same losses and predictions."""
    import zoedge
    from zoedge.runtime.streamed import BlockVisitor
    from zoedge.train.batching import collate, length_batches
    from zoedge.train.tasks import Example
    from zoedge.train.trainer import _loss_passes
    from tests.tiny import CharTokenizer, save_tiny

    save_tiny("llama", tmp_path / "hf")
    zoedge.prepare(tmp_path / "hf", tmp_path / "store", progress=False, log=lambda s: None)
    model, tok = zoedge.load(tmp_path / "store"), CharTokenizer()
    ex = [Example("good " * (i % 5) + f"{i} is", ("n", "y", "m"), i % 3) for i in range(12)]
    plain, shared = collate(tok, ex, 12), collate(tok, ex, 12, share_prompts=True)
    assert shared.num_rows == len(ex) and plain.num_rows == 3 * len(ex)
    (l1, p1), = _loss_passes(model, BlockVisitor(), plain)
    (l2, p2), = _loss_passes(model, BlockVisitor(), shared)
    assert torch.equal(p1, p2) and torch.allclose(l1, l2, atol=1e-6)
    batches = length_batches(tok, ex, 5)
    assert sorted(e.prompt for b in batches for e in b) == sorted(e.prompt for e in ex)
    lengths = [len(e.prompt) for b in batches for e in b]
    assert lengths == sorted(lengths)
    model.close()
