"""LoHO and HZO: the first-order tail's contribution is visible (issue 22's mechanism test for the hybrids).

On a tiny Llama memorising 8 examples through the trainer, each hybrid runs three ways from the same weights and
seed: the tail alone (ZO lr 0), the ZO part alone (FO lr 0) and both. The tail alone learns; both together end at
least as low as the tail alone and clearly below the ZO part alone. With the tail switched off (FO lr 0) the
first assertion fails: the weights do not move at all. Figures: docs/methods.md.
"""
from __future__ import annotations

import pytest
import torch

import zoedge
from zoedge.optim.registry import build
from zoedge.train.trainer import TrainSettings, Trainer
from tests.tiny import CharTokenizer, save_tiny, toy_examples

STEPS = 40
#: (registry name, shared options, ZO lr, FO lr): HZO trains its tail on resample steps only (every nu = 2)
HYBRIDS = {
    "loho": ("loho", dict(eps=1e-2, fo_layers="1"), 6e-3, 0.05),
    "hzo": ("hzo", dict(eps=1e-2, fo_layers=1, rank=2, nu=2), 3e-3, 0.05),
}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tails")
    save_tiny("llama", root / "hf")
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return root / "store"


def _train(store, tmp_path, name: str, options: dict) -> tuple[float, float]:
    """Training loss of the 8 examples before and after STEPS full-batch steps."""
    torch.manual_seed(0)
    ex = toy_examples(8)
    t = Trainer(zoedge.load(store), CharTokenizer(), build(name, options, seed=2), ex, [], [],
                TrainSettings(steps=STEPS, batch_size=8, seed=2), tmp_path, progress=False, log=lambda s: None)
    before = t.evaluate(ex, "train").loss
    for _ in range(STEPS):
        t.train_step()
    return before, t.evaluate(ex, "train").loss


@pytest.mark.parametrize("case", sorted(HYBRIDS))
def test_the_tail_learns_and_zo_plus_tail_is_at_least_as_good(case, tiny_store, tmp_path):
    """Measured (start 0.688): LoHO tail 0.520, ZO 0.634, both 0.270; HZO tail 0.550, ZO 0.676, both 0.539."""
    torch.set_num_threads(1)
    name, shared, zo_lr, fo_lr = HYBRIDS[case]
    start, tail = _train(tiny_store, tmp_path / "tail", name, {**shared, "lr": 0.0, "fo_lr": fo_lr})
    _, zo = _train(tiny_store, tmp_path / "zo", name, {**shared, "lr": zo_lr, "fo_lr": 0.0})
    _, both = _train(tiny_store, tmp_path / "both", name, {**shared, "lr": zo_lr, "fo_lr": fo_lr})
    assert tail < start - 0.1, ("the tail alone does not learn", case, start, tail)
    assert both <= tail + 0.02, ("ZO + tail ends above the tail alone", case, tail, both)
    assert both < zo - 0.1, ("the tail adds nothing to the ZO part", case, zo, both)
