"""Trainer: resume is bit-equal, SIGKILL while checkpointing keeps the last good one, bad input is refused."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zoedge
from zoedge.errors import DataError, StoreError, TrainingError
from zoedge.train.checkpoint import latest_checkpoint, load_checkpoint
from zoedge.train.trainer import TrainSettings, Trainer
from zoedge_plugins.mezo import MeZO
from tests.tiny import CharTokenizer, save_tiny, toy_examples

STEPS = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    save_tiny("llama", root / "hf")
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return root / "store"


def make_trainer(store, out, steps=STEPS, lr=1e-3, seed=3, **kw):
    model = zoedge.load(store)
    opt = MeZO(seed=seed, lr=lr, eps=1e-2, weight_decay=0.01)
    ex = toy_examples()
    return Trainer(model, CharTokenizer(), opt, ex, ex[:6], ex[:4],
                   TrainSettings(steps=steps, batch_size=4, seed=seed, schedule="linear", **kw), out,
                   progress=False, log=lambda s: None)


def losses_of(out: Path) -> list[float]:
    import json
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bit_equal(store, tmp_path):
    straight = make_trainer(store, tmp_path / "a")
    straight.fit()
    half = make_trainer(store, tmp_path / "b")      # same 8-step run (and LR schedule), stopped after 4
    first = [half.train_step()["loss"] for _ in range(STEPS // 2)]
    half.save()
    resumed = make_trainer(store, tmp_path / "b")
    assert resumed.resume() and resumed.step == STEPS // 2
    resumed.fit()
    assert losses_of(tmp_path / "a") == first + losses_of(tmp_path / "b")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.opt.lr == resumed.opt.lr  # the LR schedule resumed too


def test_training_changes_weights_and_never_the_store(store, tmp_path):
    before = {p: p.read_bytes() for p in sorted((store / "blocks").iterdir())}
    t = make_trainer(store, tmp_path / "run", steps=3)
    w0 = t.model.state_dict()["model.layers.0.mlp.up_proj.weight"].clone()
    t.fit()
    assert not torch.equal(w0, t.model.state_dict()["model.layers.0.mlp.up_proj.weight"])
    assert before == {p: p.read_bytes() for p in sorted((store / "blocks").iterdir())}


def test_nan_loss_stops_and_keeps_checkpoint(store, tmp_path):
    t = make_trainer(store, tmp_path / "run", steps=4, save_every=2)
    t.fit()
    good = latest_checkpoint(tmp_path / "run" / "checkpoints")
    t2 = make_trainer(store, tmp_path / "run", steps=6)
    t2.resume()
    weights = t2.model.state_dict()
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")  # a diverged update
    t2.model.load_state_dict(weights)
    # the evaluation before training already sees it: an error naming the non-finite tensor, never a metric
    with pytest.raises((TrainingError, StoreError), match="not finite|non-finite loss"):
        t2.fit()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") == good
    load_checkpoint(good)


def test_batch_larger_than_data(store, tmp_path):
    model = zoedge.load(store)
    ex = toy_examples(5)
    with pytest.raises(DataError, match="--batch-size: 8 is larger than the 5"):
        Trainer(model, CharTokenizer(), MeZO(), ex, ex, ex, TrainSettings(batch_size=8), tmp_path)


def test_sigkill_during_checkpoint_keeps_previous(store, tmp_path):
    """Kill a child process in the middle of writing checkpoint 2; checkpoint 1 must stay loadable."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, os, time
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        import safetensors.torch as st
        from tests.test_trainer import make_trainer
        from pathlib import Path
        t = make_trainer(Path({str(store)!r}), Path({str(out)!r}), steps=2)
        t.fit()                       # writes checkpoint step-2
        real = st.save_file
        def slow(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            print("WRITING", flush=True)
            time.sleep(60)            # killed here, mid-checkpoint
        import zoedge.train.checkpoint as c
        c.save_file = slow
        t.s.steps = 4
        t.fit()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "WRITING" in line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = latest_checkpoint(out / "checkpoints")
    assert ck is not None and ck.name == "step-00000002"
    weights, state = load_checkpoint(ck)
    assert state["step"] == 2 and weights
