"""The plugin guide's out-of-tree example (docs/examples/sign_momentum.py: ZO-SignSGD with momentum, its momentum
declared as framework-owned state) passes zoedge.testing's checks on both tiers: streamed == a textbook loop,
bit for bit, in every layout; a resume equals the uninterrupted run with its momentum; it imports only the API."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from zoedge.optim.api import make_noise
from zoedge.optim.state import OptimizerState
from zoedge.testing import check_resume_equals_uninterrupted, check_streamed_equals_resident
from tests.test_plugin_contract import zoedge_imports

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "sign_momentum.py"
LR, EPS, BETA = 1e-3, 1e-2, 0.8


def load_example():
    spec = importlib.util.spec_from_file_location("sign_momentum_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SignMomentum


def make(seed, beta=BETA):
    return load_example()(seed=seed, lr=LR, eps=EPS, beta=beta)


def reference(params, loss, steps, seed, beta=BETA):
    """ZO-SignSGD with momentum, textbook: eager updates on resident weights, the same noise function."""
    noise = make_noise("gaussian", seed)
    m = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    out = []
    for t in range(steps):
        z = {n: noise.normal(tuple(p.shape), t, n, "z0", dtype=p.dtype) for n, p in params.items()}
        ls = [loss({n: torch.add(p, z[n], alpha=a) for n, p in params.items()}, t) for a in (EPS, -EPS)]
        g = (ls[0] - ls[1]) / (2 * EPS)
        for n, p in params.items():
            m[n].mul_(beta).add_(z[n], alpha=(1 - beta) * g)
            p.sub_(m[n].sign(), alpha=LR)
        out.append(ls)
    return out


def test_example_is_short_and_imports_only_the_api():
    assert len(EXAMPLE.read_text().splitlines()) <= 40
    assert set(zoedge_imports(EXAMPLE)) == {"zoedge.optim.api"}
    assert "state_dict" not in EXAMPLE.read_text() and "plugin_state" not in EXAMPLE.read_text()


def test_streamed_equals_resident_on_both_tiers(tmp_path):
    check_streamed_equals_resident(make, reference, directory=tmp_path, steps=3)


def test_the_check_fails_on_another_method(tmp_path):
    with pytest.raises(AssertionError, match="in-place layout, ram tier"):
        check_streamed_equals_resident(make, lambda *a: reference(*a, beta=0.5), directory=tmp_path, steps=3,
                                       tiers=("ram",), layouts=("in-place",))


def test_resume_is_bit_equal_with_its_momentum(tmp_path):
    check_resume_equals_uninterrupted(make, directory=tmp_path)
    kept = list((tmp_path / "straight-disk" / "working" / "optimizer-state").glob("m.*.bin"))
    assert kept, "the disk tier keeps the momentum in files beside the working copy"
    opt = make(0)
    assert not opt.replayable  # its update reads its momentum: checkpoints hold the weights


def test_the_resume_check_fails_when_the_momentum_is_lost(tmp_path, monkeypatch):
    monkeypatch.setattr(OptimizerState, "load_state_dict", lambda self, state: None)  # a resume forgetting it
    with pytest.raises(AssertionError, match="ram tier"):
        check_resume_equals_uninterrupted(make, directory=tmp_path, tiers=("ram",))


def test_plan_counts_its_state(tmp_path, capsys, monkeypatch):
    from zoedge.cli import main
    from zoedge.optim import registry
    from zoedge.optim.api import register_optimizer
    from zoedge.store.manifest import load_manifest
    from zoedge.testing import tiny_store

    _, store = tiny_store(tmp_path)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registered for this test only
    register_optimizer("sign-momentum-example")(load_example())
    weights = sum(t.numel for b in load_manifest(store).blocks for t in b.tensors)  # every stored tensor, once
    plans = {}
    for tier in ("ram", "disk"):
        for extra in ([], ["--optimizer", "sign-momentum-example", "--opt", "beta=0.5"]):
            assert main(["plan", str(store), "--seq", "8", "--tier", tier, "--json", "-", *extra]) == 0
            plans[tier, bool(extra)] = json.loads(capsys.readouterr().out)
    assert plans["ram", True]["optimizer_state"] == 4 * weights  # one fp32 momentum per weight element
    assert plans["ram", True]["host_ram"] - plans["ram", False]["host_ram"] == 4 * weights
    assert plans["disk", True]["disk"] - plans["disk", False]["disk"] == 4 * weights
    assert plans["disk", True]["host_ram"] == plans["disk", False]["host_ram"]


def test_memory_counts_its_state_on_the_host_tier(tmp_path, capsys, monkeypatch):
    """``zoedge memory`` reports the momentum where ``plan`` counts it (the host tier, predicted by the same code),
    not in the device peak: on the CPU, where the host is the device, the device figures still match the plan."""
    from zoedge.cli import main
    from zoedge.optim import registry
    from zoedge.optim.api import register_optimizer
    from zoedge.store.manifest import load_manifest
    from zoedge.testing import tiny_store

    _, store = tiny_store(tmp_path)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registered for this test only
    register_optimizer("sign-momentum-example")(load_example())
    weights = sum(t.numel for b in load_manifest(store).blocks for t in b.tensors)
    assert main(["memory", str(store), "--max-length", "8", "--optimizer", "sign-momentum-example", "--no-progress",
                 "--json", "-"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["optimizer_state_bytes"] == m["predicted_optimizer_state"] == 4 * weights
    assert abs(m["ratio"] - 1) < 0.05  # the momentum (here more than the device peak) is not counted on the device
