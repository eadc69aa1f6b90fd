"""MeZO's options and what it reports, written from its documented contract (plugins/mezo.py's docstrings):
the paper's defaults, the refused values, the projected gradient as the mean of the directions' estimates, and the
pass pairs it declares for direction-split data parallel."""
from __future__ import annotations

import pytest
import torch

from zoedge_plugins.mezo import MeZO


def draw(opt: MeZO) -> torch.Tensor:
    z = torch.empty(8)
    opt.z(0, "w", 0)(z, 0, z.numel())
    return z


def test_defaults_are_one_direction_and_seed_zero():
    opt = MeZO()
    assert (opt.q, opt.passes, opt.eps, opt.stochastic_rounding) == (1, 2, 1e-3, False)
    assert torch.equal(draw(opt), draw(MeZO(seed=0)))
    assert not torch.equal(draw(opt), draw(MeZO(seed=1)))  # the comparison can fail


@pytest.mark.parametrize("options", [dict(eps=0.0), dict(eps=-1e-3), dict(q=0), dict(noise="uniform")])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        MeZO(**options)


def test_smallest_valid_options_are_accepted():
    opt = MeZO(eps=1e-30, q=1)
    assert (opt.eps, opt.q) == (1e-30, 1)


def test_projected_gradient_is_the_mean_over_directions():
    """q = 3, ε = 0.5: losses (L₊, L₋) per direction give g_k = L₊ − L₋; the reported metric is their mean and
    the update carries each g_k."""
    opt = MeZO(q=3, eps=0.5, lr=0.1)
    update = opt.end_step([torch.tensor(x) for x in (3.0, 1.0, 2.0, 2.0, 0.0, 5.0)])
    assert update["g"] == [2.0, 0.0, -5.0]
    assert update.metrics["projected_grad"] == pytest.approx(-1.0)
    assert update["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("q", [1, 3])
def test_direction_passes_pair_plus_and_minus(q):
    """Direction k is evaluated by passes 2k (θ + εz_k) and 2k + 1 (θ − εz_k): what direction-split data
    parallel hands to each rank."""
    assert MeZO(q=q).direction_passes() == [[2 * k, 2 * k + 1] for k in range(q)]
    assert MeZO(q=3).direction_passes() == [[0, 1], [2, 3], [4, 5]]
