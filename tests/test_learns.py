"""Every shipped optimizer learns: on a quadratic (through the plugin hooks) and on a tiny model memorising a few
examples (through the trainer), its loss goes down. An update with the wrong sign, a wrong scale by orders of
magnitude or a direction that does not match the perturbation makes the loss go up or stay put: these fail.

Plugins are built by their registry names with ``--opt``-style options (not imported), as a run builds them."""
from __future__ import annotations

import pytest
import torch

import zoedge
from zoedge.optim.registry import build
from zoedge.train.trainer import TrainSettings, Trainer
from tests.plugin_harness import quadratic_steps, resident_block
from tests.tiny import CharTokenizer, save_tiny, toy_examples

#: (registry name, options) of every shipped optimizer: hyper-parameters for the quadratic below (30 unknowns)
QUADRATIC = {
    "mezo": dict(lr=0.02, eps=1e-3),
    "mezo-q2": dict(lr=0.02, eps=1e-3, q=2),
    "hizoo-l": dict(lr=0.02, eps=1e-3, alpha=1e-3),
    "hzo": dict(lr=0.02, eps=1e-3, rank=2, nu=5),
    "loho": dict(lr=0.02, eps=1e-3, fo_layers="0"),
    "dizo": dict(lr=0.02, eps=1e-3, cycle=0),
}


def registry_name(case: str) -> str:
    return case.split("-q")[0]


@pytest.mark.parametrize("case", sorted(QUADRATIC))
def test_quadratic_loss_goes_down(case):
    """L = ½ Σ a (θ − θ*)², a in [0.5, 2]: 300 steps from θ = 0 take L below 15% of its start (a step of the
    right size in a wrong direction, or uphill, ends far above it)."""
    g = torch.Generator().manual_seed(0)
    target = {"w": torch.randn(4, 6, generator=g), "b": torch.randn(6, generator=g)}
    curv = {n: 0.5 + 1.5 * torch.rand(t.shape, generator=g) for n, t in target.items()}

    def loss(ts):
        return 0.5 * sum((curv[n] * (ts[n] - target[n]) ** 2).sum() for n in ts)

    block = resident_block("layers.0", {n: torch.zeros_like(t) for n, t in target.items()})
    start = float(loss(block.tensors))
    opt = build(registry_name(case), QUADRATIC[case], seed=1)
    quadratic_steps(opt, block, loss, 300)
    end = float(loss(block.tensors))
    assert end < 0.15 * start, (case, start, end)


#: options for the tiny model (a few thousand weights): ZO alone, and the hybrids with their first-order layer
TINY = {
    "mezo": dict(lr=3e-3, eps=1e-2),
    "hizoo-l": dict(lr=3e-3, eps=1e-2, alpha=1e-3),
    "hzo": dict(lr=3e-3, eps=1e-2, rank=2, nu=5),
    "loho": dict(lr=6e-3, eps=1e-2, fo_layers="1", fo_lr=0.0),  # the ZO part alone: FO lr 0
    "loho-fo": dict(lr=0.0, eps=1e-2, fo_layers="1", fo_lr=0.05),  # the FO part alone: ZO lr 0
    "dizo": dict(lr=3e-3, eps=1e-2, cycle=4, iters=2),
}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("learns")
    save_tiny("llama", root / "hf")
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return root / "store"


@pytest.mark.parametrize("case", sorted(TINY))
def test_tiny_model_memorises(case, tiny_store, tmp_path):
    """Full-batch training on 8 examples: the training loss after 40 steps is below its start by a margin the
    ZO noise does not reach by chance (the same run with the update's sign flipped ends above its start)."""
    torch.manual_seed(0)
    ex = toy_examples(8)
    opt = build(case.split("-fo")[0], TINY[case], seed=2)
    t = Trainer(zoedge.load(tiny_store), CharTokenizer(), opt, ex, [], [],
                TrainSettings(steps=40, batch_size=8, seed=2), tmp_path, progress=False, log=lambda s: None)
    before = t.evaluate(ex, "train").loss
    for _ in range(40):
        t.train_step()
    after = t.evaluate(ex, "train").loss
    assert after < before - 0.02, (case, before, after)
