"""Every shipped plugin resumes bit-equal: N steps straight == N/2 + checkpoint + resume + N/2 (CPU fp32),
including plugin state (Hessian factors, first-order optimizer state, HZO factors, DiZO phases)."""
from __future__ import annotations

import json

import pytest
import torch

import zoedge
from zoedge.optim.registry import build
from zoedge.train.trainer import TrainSettings, Trainer
from tests.tiny import CharTokenizer, save_tiny, toy_examples

STEPS = 6
PLUGINS = [
    ("hizoo-l", {"alpha": "1e-3", "lr": "1e-3", "eps": "1e-2"}),
    ("loho", {"fo_layers": "1", "fo_optimizer": "adamw", "lr": "1e-3", "eps": "1e-2", "fo_lr": "1e-2"}),
    ("loho", {"fo_layers": "1", "mode": "intra", "intra_p": "0.2", "fo_optimizer": "adamw", "lr": "1e-3",
              "eps": "1e-2", "fo_lr": "1e-2"}),
    ("dizo", {"cycle": "3", "iters": "2", "gamma_lr": "1e4", "lr": "5e-3", "eps": "1e-2"}),
    ("hzo", {"nu": "3", "rank": "2", "fo_layers": "1", "lr": "1e-2", "eps": "1e-2", "fo_lr": "1e-2"}),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_tiny("llama", root / "hf")
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return root / "store"


def make(store, out, name, opts):
    ex = toy_examples()
    return Trainer(zoedge.load(store), CharTokenizer(), build(name, opts, seed=4), ex, ex[:4], [],
                   TrainSettings(steps=STEPS, batch_size=4, seed=4), out, progress=False, log=lambda s: None)


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name,opts", PLUGINS, ids=[f"{n}-{o.get('mode', '')}" for n, o in PLUGINS])
def test_resume_is_bit_equal(store, tmp_path, name, opts):
    straight = make(store, tmp_path / "a", name, opts)
    straight.fit()
    half = make(store, tmp_path / "b", name, opts)
    first = [half.train_step()["loss"] for _ in range(STEPS // 2)]
    half.save()
    resumed = make(store, tmp_path / "b", name, opts)
    assert resumed.resume()
    resumed.fit()
    assert losses(tmp_path / "a") == first + losses(tmp_path / "b")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _legacy(trainer):
    trainer.opt.noise = trainer.opt.noise.reseeded(trainer.opt.seed, "mt19937")
    return trainer


def test_a_checkpoint_that_names_no_noise_generator_resumes_with_the_one_it_was_trained_with(store, tmp_path):
    """Checkpoints written before the Philox kernel hold no ``noise_generator``: they were drawn by mt19937 chunks,
    and a resume must keep drawing those (the lazy update redraws the previous step's noise)."""
    opts = {"lr": "1e-3", "eps": "1e-2"}
    straight = _legacy(make(store, tmp_path / "a", "mezo", opts))
    straight.fit()
    half = _legacy(make(store, tmp_path / "b", "mezo", opts))
    first = [half.train_step()["loss"] for _ in range(STEPS // 2)]
    half.save()
    (state_file,) = (tmp_path / "b").glob("checkpoints/*/state.json")
    state = json.loads(state_file.read_text())
    assert state["optimizer"].pop("noise_generator") == "mt19937"
    state_file.write_text(json.dumps(state))  # as an older zoedge wrote it
    resumed = make(store, tmp_path / "b", "mezo", opts)  # built with the default generator, philox
    assert resumed.resume()
    assert resumed.opt.noise.generator == "mt19937"
    resumed.fit()
    assert losses(tmp_path / "a") == first + losses(tmp_path / "b")
    philox = make(store, tmp_path / "c", "mezo", opts)
    philox.fit()
    assert losses(tmp_path / "c")[1:] != losses(tmp_path / "a")[1:]  # the generators do differ
