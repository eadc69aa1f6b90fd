"""The plugin guide's shortest plugin (docs/examples/zo_sgd.py) is real: streamed == the textbook loop on both
tiers in every layout, and, as it claims to be replayable, a resume from an update log is bit-equal."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from zoedge.optim import registry
from zoedge.optim.api import make_noise
from zoedge.testing import check_resume_equals_uninterrupted, check_streamed_equals_resident
from tests.test_plugin_contract import zoedge_imports

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "zo_sgd.py"
LR, EPS = 1e-3, 1e-2


def load_example(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registered for this test only
    spec = importlib.util.spec_from_file_location("zo_sgd_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ZOSGD


def reference(params, loss, steps, seed):
    noise = make_noise("gaussian", seed)
    out = []
    for t in range(steps):
        z = {n: noise.normal(tuple(p.shape), t, n, "z0") for n, p in params.items()}
        ls = [loss({n: torch.add(p, z[n], alpha=a) for n, p in params.items()}, t) for a in (EPS, -EPS)]
        g = (ls[0] - ls[1]) / (2 * EPS)
        for n, p in params.items():
            p.add_(z[n], alpha=-LR * g)
        out.append(ls)
    return out


def test_shortest_plugin_is_real(tmp_path, monkeypatch):
    cls = load_example(monkeypatch)
    assert len(EXAMPLE.read_text().splitlines()) <= 30 and set(zoedge_imports(EXAMPLE)) == {"zoedge.optim.api"}
    assert registry.load("zo-sgd") is cls
    check_streamed_equals_resident(lambda seed: cls(seed=seed, lr=LR, eps=EPS), reference, directory=tmp_path / "s",
                                   steps=3)
    check_resume_equals_uninterrupted(lambda seed: cls(seed=seed, lr=LR, eps=EPS), directory=tmp_path / "r",
                                      checkpoint_weights="updates")


def test_the_guide_shows_the_tested_examples():
    guide = (EXAMPLE.parent.parent / "plugins.md").read_text()
    for example in ("zo_sgd.py", "sign_momentum.py"):
        assert (EXAMPLE.parent / example).read_text() in guide, example
