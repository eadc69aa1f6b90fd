"""Issue 19, defects 3, 5, 6 and 8: self-contained exports and store leases (commands run against a live run),
no metric of a broken model, options that take effect or are refused, clear errors for full disks and positions.
Every test here fails on the code before the fix."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import zoedge.train.job as job
from zoedge.cli import main
from zoedge.store.cache import stores_dir
from zoedge.store.lease import LEASES, StoreLease, in_use
from tests.test_cli_finetune import setup  # noqa: F401  (fixture: tiny Llama HF dir + train.jsonl + base args)
from tests.test_tasks import _tokenizer

ROOT = Path(__file__).resolve().parent.parent


def the_store() -> Path:
    (store,) = [p for p in stores_dir().iterdir() if p.is_dir()]
    return store


def assert_export_is_the_run(out: Path, steps: int) -> None:
    """OUTPUT/model loads with transformers and holds exactly the run's last checkpoint's weights."""
    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    AutoTokenizer.from_pretrained(out / "model")
    trained = load_file(str(out / "checkpoints" / f"step-{steps:08d}" / "model.safetensors"))
    for n, p in exported.named_parameters():
        assert torch.equal(p.detach(), trained[n]), n


# ------------------------------------------------------------------------------------ 3: commands against a run
def test_commands_against_a_live_run_leave_its_store_and_export_alone(setup, tmp_path, capsys):
    """Acceptance (issue 19): a finetune (another process) runs while `cache prune --all`, `prepare` of the same
    model (into its store, into a new directory, and a rebuild after the source changed) and `eval` of the same
    run are started against it. They refuse clearly or work on their own copy; the run's export loads with
    transformers, equals its weights and has the config it started with. Once the run has ended, its lease is gone."""
    tmp, _, base = setup
    out, pause = tmp / "run", tmp / "pause"
    pause.mkdir()
    cmd = [sys.executable, str(ROOT / "tests" / "paused_finetune.py"), str(pause), *base[1:], "--steps", "3",
           "--threads", "1", "--no-plot", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (pause / "started").exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the finetune did not start"
            time.sleep(0.05)
        store = the_store()
        assert in_use(store) == f"pid {child.pid}@{os.uname().nodename}"
        capsys.readouterr()
        # cache prune --all: the store in use is kept, named with its user
        assert main(["cache", "prune", "--all"]) == 0
        err = capsys.readouterr().err
        assert f"kept {store}: in use by pid {child.pid}" in err and (store / "manifest.json").is_file()
        # prepare of the same model into its store: refused; into a new directory: its own copy
        assert main(["prepare", str(tmp / "hf"), str(store), "--no-progress"]) == 2
        assert "in use by pid" in capsys.readouterr().err
        assert main(["prepare", str(tmp / "hf"), str(tmp / "own"), "--no-progress"]) == 0
        # the source changes: a command that would rebuild the cached store is refused while the run uses it
        config = json.loads((tmp / "hf" / "config.json").read_text())
        (tmp / "hf" / "config.json").write_text(json.dumps({**config, "zoedge_test_marker": 1}))
        assert main(["eval", "--model", str(tmp / "hf"), "--train", str(tmp / "train.jsonl"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "changed since this store was prepared" in err and "in use by pid" in err
        # eval of the run itself: it is not finished
        assert main(["eval", "--model", str(out), "--no-progress"]) == 2
        assert "finetune run in progress" in capsys.readouterr().err
        assert main(["eval", "--model", str(out / "model"), "--no-progress"]) == 2
    finally:
        (pause / "go").write_text("1")
        stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    assert_export_is_the_run(out, 3)
    assert "zoedge_test_marker" not in json.loads((out / "model" / "config.json").read_text())
    assert in_use(store) is None  # the lease ended with the run: prune may now delete the store
    capsys.readouterr()
    assert main(["cache", "prune", "--all"]) == 0 and not store.exists()


def test_export_uses_the_files_the_run_started_with(setup, monkeypatch):
    """Whatever happens to the store's config and tokenizer files during a run, the export has the ones the run
    started with (before: copied from the store at the end, so an export without config.json, exit 0)."""
    tmp, _, base = setup
    real_fit = job.Trainer.fit

    def fit_then_damage(self):
        result = real_fit(self)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (self.model.store / name).unlink()
        return result
    monkeypatch.setattr(job.Trainer, "fit", fit_then_damage)
    out = tmp / "run"
    assert main(base + ["--steps", "2", "--no-plot", "--output", str(out)]) == 0
    assert_export_is_the_run(out, 2)


def test_a_dead_process_lease_does_not_block(tmp_path):
    """A lease of a process that died (even by SIGKILL) is stale: detected, removed, not counted."""
    store = tmp_path / "store"
    store.mkdir()
    code = (f"from zoedge.store.lease import StoreLease; import time; StoreLease({str(store)!r}); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "held"
    assert in_use(store) == f"pid {holder.pid}@{os.uname().nodename}"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert len(list((store / LEASES).iterdir())) == 1  # its lease file is still there ...
    assert in_use(store) is None and not list((store / LEASES).iterdir())  # ... but stale, and removed
    with StoreLease(store):  # this process's own lease counts while held
        assert in_use(store) == f"pid {os.getpid()}@{os.uname().nodename}"
    assert in_use(store) is None


# ------------------------------------------------------------------------------------- 5: metrics of a broken model
def nan_model(tmp: Path, model) -> Path:
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp / "nan")
    _tokenizer(bos=True).save_pretrained(tmp / "nan")
    return tmp / "nan"


def test_eval_of_a_model_with_a_nan_weight_is_an_error_not_an_accuracy(setup, capsys):
    tmp, model, _ = setup
    path = nan_model(tmp, model)
    assert main(["eval", "--model", str(path), "--train", str(tmp / "train.jsonl"), "--n-dev", "8", "--n-test", "8",
                 "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "accuracy" not in captured.out
    assert "weights are not finite" in captured.err and "model.layers.0.mlp.up_proj.weight" in captured.err


@pytest.mark.parametrize("n_dev", ["8", "0"])
def test_finetune_of_a_nan_model_names_the_weights_not_the_lr(setup, capsys, n_dev):
    """Before the first step the cause is the model, not the learning rate (with a dev set the first evaluation
    finds it, without one the first step's guard)."""
    tmp, model, base = setup
    path = nan_model(tmp, model)
    args = [a if a != str(tmp / "hf") else str(path) for a in base]
    args[args.index("--n-dev") + 1] = n_dev
    code = main(args + ["--steps", "2", "--output", str(tmp / "run")])
    err = capsys.readouterr().err
    assert code in (2, 3) and "weights are not finite" in err and "model.layers.0.mlp.up_proj.weight" in err
    assert "lower --lr" not in err and not (tmp / "run" / "model").exists()


def test_evaluate_counts_nonfinite_scores_and_reports_no_figures(tiny):
    """The metric path itself: NaN scores give no loss and no accuracy (argmax over NaN picked candidate 0)."""
    import zoedge
    from tests.tiny import CharTokenizer, toy_examples
    from zoedge.train.trainer import evaluate
    _, store = tiny
    model = zoedge.load(store)
    examples = toy_examples(12)
    assert evaluate(model, CharTokenizer(), examples, batch_size=4, max_length=32).nonfinite == 0
    weights = {k: v.clone() for chunk in model.weight_stream().chunks for k, v in chunk.items()}
    name = next(k for k in weights if k.endswith("layers.0.fc1.weight") or k.endswith("layers.0.mlp.up_proj.weight"))
    weights[name][0, 0] = float("nan")
    model.load_state_dict(weights)
    ev = evaluate(model, CharTokenizer(), examples, batch_size=4, max_length=32)
    assert ev.nonfinite == 12 and ev.accuracy is None and ev.loss != ev.loss


# ------------------------------------------------------------------------------------------ 6: options take effect
def test_eval_dtype_takes_effect(setup, capsys):
    """eval --dtype bf16 of a checkpoint evaluates a bf16 store (before: the fp32 one, recording bf16)."""
    tmp, _, _ = setup
    args = ["eval", "--model", str(tmp / "hf"), "--train", str(tmp / "train.jsonl"), "--n-dev", "8", "--n-test", "0",
            "--no-progress"]
    losses = {}
    for dtype in ("fp32", "bf16"):
        assert main(args + ["--dtype", dtype]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["settings"]["dtype"] == dtype
        losses[dtype] = res["dev"]["loss"]
    assert sorted(p.name.split("-")[1] for p in stores_dir().iterdir() if p.is_dir()) == ["bf16", "fp32"]
    assert losses["bf16"] != losses["fp32"]


def test_a_stores_dtype_is_used_and_another_is_refused(setup, capsys):
    """finetune --model STORE uses (and records) the store's dtype; --dtype fp32 on a bf16 store is refused
    (before: trained in bf16, recorded fp32)."""
    tmp, _, base = setup
    assert main(["prepare", str(tmp / "hf"), str(tmp / "bf16"), "--dtype", "bf16", "--no-progress"]) == 0
    args = [a if a != str(tmp / "hf") else str(tmp / "bf16") for a in base] + ["--steps", "1", "--no-plot"]
    capsys.readouterr()
    assert main(args + ["--dtype", "fp32", "--output", str(tmp / "refused")]) == 2
    err = capsys.readouterr().err
    assert "--dtype: fp32, but the store" in err and "bf16" in err and not (tmp / "refused" / "run.json").exists()
    assert main(args + ["--output", str(tmp / "run")]) == 0
    assert json.loads((tmp / "run" / "summary.json").read_text())["settings"]["dtype"] == "bf16"
    assert load_file(str(tmp / "run" / "model" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    capsys.readouterr()
    # eval of the run evaluates in the run's dtype unless told otherwise
    assert main(["eval", "--model", str(tmp / "run"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["dtype"] == "bf16"


# ------------------------------------------------------------------------------------------- 8: clear errors
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_the_export_is_a_clear_error_and_resume_writes_it(setup, monkeypatch, capsys):
    tmp, _, base = setup
    import zoedge.store.safetensors_io as io
    real = io.write_streamed
    monkeypatch.setattr(io, "write_streamed", lambda path, *a, **k: enospc() if Path(path).parent.name == "model.tmp"
                        else real(path, *a, **k))
    out = tmp / "run"
    args = base + ["--steps", "2", "--no-plot", "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot write the exported model (the disk is full)" in err and "--resume" in err and "step-00000002" in err
    assert not (out / "model.tmp").exists() and not (out / "model").exists()
    monkeypatch.setattr(io, "write_streamed", real)
    assert main(args + ["--resume"]) == 0
    assert_export_is_the_run(out, 2)


def test_disk_full_writing_the_metrics_is_a_clear_error(setup, monkeypatch, capsys):
    tmp, _, base = setup
    import zoedge.train.trainer as trainer

    class Full:
        def __init__(self, path, *a, **k):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            if str(self.path).endswith("metrics.jsonl"):
                enospc()
    monkeypatch.setattr(trainer, "open", Full, raising=False)
    assert main(base + ["--steps", "2", "--output", str(tmp / "run")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl: cannot write the metrics of step 1 (the disk is full)" in err
    assert "no checkpoint has been written" in err


def test_disk_full_at_the_first_checkpoint_claims_no_earlier_one(setup, monkeypatch, capsys):
    tmp, _, base = setup
    import zoedge.train.checkpoint as ck
    monkeypatch.setattr(ck, "save_file", enospc)
    assert main(base + ["--steps", "2", "--output", str(tmp / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot write checkpoint step-00000002" in err and "no earlier checkpoint" in err
    assert "previous checkpoint" not in err


def test_disk_full_writing_the_summary_or_eval_json_is_a_clear_error(setup, monkeypatch, capsys):
    tmp, _, base = setup
    monkeypatch.setattr(job, "atomic_write_bytes", enospc)
    assert main(["eval", "--model", str(tmp / "hf"), "--train", str(tmp / "train.jsonl"), "--n-dev", "4",
                 "--n-test", "0", "--no-progress", "--json", str(tmp / "res.json")]) == 2
    assert "res.json: cannot write res.json (the disk is full)" in capsys.readouterr().err


def test_max_length_beyond_the_positions(setup, capsys):
    """OPT (learned positions) past max_position_embeddings is refused before loading; Llama (rotary) warns."""
    from transformers import OPTConfig
    tmp, _, base = setup
    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=320, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                     num_attention_heads=4, max_position_embeddings=16))
    opt.save_pretrained(tmp / "opt")
    _tokenizer(bos=True).save_pretrained(tmp / "opt")
    args = [a if a != str(tmp / "hf") else str(tmp / "opt") for a in base] + ["--steps", "1", "--no-plot"]
    assert main(args + ["--max-length", "40", "--output", str(tmp / "opt-run")]) == 2
    err = capsys.readouterr().err
    assert "--max-length: 40 is beyond the 16 positions" in err and "use --max-length 16 or less" in err
    assert main(["eval", "--model", str(tmp / "opt"), "--train", str(tmp / "train.jsonl"), "--max-length", "40",
                 "--no-progress"]) == 2
    assert "--max-length" in capsys.readouterr().err
    assert main(args + ["--max-length", "16", "--output", str(tmp / "opt-ok")]) == 0
    config = AutoConfig.from_pretrained(tmp / "hf")
    config.max_position_embeddings = 16
    config.save_pretrained(tmp / "hf")
    capsys.readouterr()
    assert main(base + ["--steps", "1", "--no-plot", "--max-length", "40", "--output", str(tmp / "llama")]) == 0
    assert "warning: --max-length 40 is beyond the 16 positions" in capsys.readouterr().err


# ---------------------------------------------------------------- 6 and 8: every option takes effect or is refused
@pytest.mark.parametrize("extra, what", [
    (["--seed", "-1"], "--seed: -1 is too small"),
    (["--seed", str(2**63)], "--seed: 9223372036854775808 is too large"),  # before: ValueError traceback
    (["--task", "demo"], "--task: 'demo' is a built-in task, but --train"),  # before: ignored, recorded
    (["--allow-changes"], "--allow-changes: is given without --resume"),  # before: ignored
])
def test_finetune_options_without_effect_or_out_of_range_are_refused(setup, monkeypatch, capsys, extra, what):
    tmp, _, base = setup
    monkeypatch.setattr(job, "StreamedModel", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(base + extra + ["--output", str(tmp / "run")]) == 2
    assert what in capsys.readouterr().err


@pytest.mark.parametrize("argv, what", [
    (["plan", "llama-2-7b", "--layers", "0"], "--layers: 0 is too small"),  # before: 0 silently meant "all"
    (["plan", "llama-2-7b", "--layers", "-2"], "--layers: -2 is too small"),  # before: ValueError traceback
    (["plan", "llama-2-7b", "--chunk-mib", "0"], "--chunk-mib: 0 is too small"),
    (["plan", "llama-2-7b", "--disk-gbps", "nan"], "--disk-gbps: nan is not a finite number"),  # before: nan GB/s
    (["cache", "prune", "--older-than", "nan"], "--older-than: nan is not a finite number"),
    (["synth", "llama-2-7b", "OUT", "--layers", "0"], "--layers: 0 is too small"),
    (["memory", "STORE", "--batch-size", "0"], "--batch-size: 0 is too small"),
])
def test_command_options_are_range_checked_where_parsed(argv, what, capsys):
    assert main(argv) == 2
    assert what in capsys.readouterr().err


def test_disk_full_anywhere_else_is_a_clear_error_not_a_traceback(setup, monkeypatch, capsys):
    """The net under the named writes: an ENOSPC no command named itself (here: run.json) is an error message."""
    tmp, _, base = setup
    import zoedge.train.run_record as run_record

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(run_record, "atomic_write_bytes", full)
    assert main(base + ["--steps", "1", "--output", str(tmp / "run")]) == 2
    err = capsys.readouterr().err
    assert "run.json: cannot be written (the disk is full)" in err and "--resume" in err


def test_disk_full_drawing_the_plot_is_a_clear_error(setup, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    tmp, _, base = setup
    monkeypatch.setattr(Figure, "savefig", enospc)
    out = tmp / "run"
    assert main(base + ["--steps", "1", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "curves.png: cannot write the plot (the disk is full)" in err and "--no-plot" in err
    assert not list(out.glob(".curves*"))
