"""A run that passes no ``--opt`` gets each shipped optimizer's defaults: they are part of what a run means (two
runs of one command line on two versions must train alike), so they are pinned here, built as a run builds them
(by registry name, no options). Changing one is a decision: update this table and say so in the change."""
from __future__ import annotations

import pytest

from zoedge.optim.registry import build

DEFAULTS = {
    "mezo": dict(eps=1e-3, q=1, passes=2, stochastic_rounding=False),
    "dizo": dict(eps=1e-3, q=1, cycle=50, iters=10, mu=0.2, gamma_lr=1.0, tau=0.2),
    "hizoo-l": dict(eps=1e-3, alpha=1e-8, h_min=1e-4, h_max=1e4, estimator="unbiased", factored=True),
    "loho": dict(eps=1e-3, q=1, fo_layers="2", mode="inter", intra_p=0.1, fo_optimizer="sgd", fo_lr=1e-4),
    "hzo": dict(eps=1e-3, rank=4, nu=50, vector="dense", factors="merge", fo_layers=0, fo_optimizer="sgd"),
}
LR = {"mezo": 4e-5, "dizo": 4e-5, "hizoo-l": 4e-5, "loho": 1e-5, "hzo": 1e-5}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_defaults(name):
    opt = build(name, {}, seed=0)
    assert {k: getattr(opt, k) for k in DEFAULTS[name]} == DEFAULTS[name]
    assert opt.param_groups[0]["lr"] == LR[name]
    assert opt.param_groups[0].get("weight_decay", 0.0) == 0.0  # hzo has none


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_the_seed_is_the_runs(name):
    assert build(name, {}, seed=7).seed == 7
