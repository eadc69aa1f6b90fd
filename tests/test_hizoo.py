"""HiZOO-L: α = 0 is MeZO; streamed == a resident HiZOO-L written here; H approaches diag(A) on a quadratic and
stays finite and clamped at any α."""
from __future__ import annotations

import pytest
import torch

from zoedge.noise.source import NoiseSource
from zoedge_plugins.hizoo import HiZOOL
from zoedge_plugins.mezo import MeZO
from tests.plugin_harness import batches, quadratic_steps, resident_block, run_streamed
from tests.test_mezo import resident_loss
from tests.tiny import toy_examples

STEPS, BS, LR, EPS, WD, SEED = 6, 4, 1e-3, 1e-2, 0.1, 3


def test_alpha_zero_is_mezo(tiny):
    _, store = tiny
    ex = toy_examples()
    h_losses, h_state = run_streamed(HiZOOL(seed=SEED, lr=LR, eps=EPS, alpha=0.0, weight_decay=WD), store, ex,
                                     STEPS, BS, SEED)
    m_losses, m_state = run_streamed(MeZO(seed=SEED, lr=LR, eps=EPS, weight_decay=WD), store, ex, STEPS, BS, SEED)
    assert [l[1:] for l in h_losses] == m_losses
    for k in m_state:
        assert torch.equal(h_state[k], m_state[k]), k


def resident_hizoo(model, examples, alpha):
    """HiZOO-L on the resident model, eager, written from the paper's formulas."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    hs = {n: ({"r": torch.full((p.shape[0],), float(p.shape[1])), "c": torch.full((p.shape[1],), float(p.shape[0]))}
              if p.ndim == 2 else {"h": torch.ones_like(p)}) for n, p in params.items()}

    def hess(n):
        st = hs[n]
        return st["h"].clone() if "h" in st else (torch.outer(st["r"], st["c"]) / st["r"].sum()).clamp(1e-4, 1e4)

    noise, losses = NoiseSource(SEED), []
    with torch.no_grad():
        for t, batch in enumerate(batches(examples, STEPS, BS, SEED)):
            z = {n: noise.normal(p.shape, t, n, "z0") for n, p in params.items()}
            h = {n: hess(n) for n in params}
            zs = {n: z[n] / h[n].sqrt() for n in params}
            step = [float(resident_loss(model, params, batch))]
            for sgn in (1, -1):
                step.append(float(resident_loss(model, {n: p + sgn * EPS * zs[n] for n, p in params.items()}, batch)))
            g = (step[1] - step[2]) / (2 * EPS)
            c = (step[1] + step[2] - 2 * step[0]) / (2 * EPS ** 2)
            for n, p in params.items():
                if p.ndim >= 2:
                    p.mul_(1 - LR * WD)
                p.sub_(LR * g * zs[n])
                est = alpha * c * h[n] * (z[n] ** 2 - 1)
                st = hs[n]
                if "h" in st:
                    st["h"] = ((1 - alpha) * st["h"] + est).clamp(1e-4, 1e4)
                else:
                    st["r"] = (1 - alpha) * st["r"] + est.sum(1)
                    st["c"] = (1 - alpha) * st["c"] + est.sum(0)
            losses.append(step)
    return losses, params, hs


def test_streamed_equals_resident(tiny):
    model, store = tiny
    alpha = 1e-3
    opt = HiZOOL(seed=SEED, lr=LR, eps=EPS, alpha=alpha, weight_decay=WD)
    got, state = run_streamed(opt, store, toy_examples(), STEPS, BS, SEED)
    ref, params, hs = resident_hizoo(model, toy_examples(), alpha)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    for n, p in params.items():
        torch.testing.assert_close(state[n], p, rtol=1e-5, atol=1e-6)
    moved = 0
    for n, st in hs.items():
        for k in st:
            torch.testing.assert_close(opt.h[n][k], st[k], rtol=1e-4, atol=1e-5)
            moved += not torch.allclose(st[k], torch.full_like(st[k], st[k].flatten()[0]))
    assert moved  # the Hessian did change
    assert opt.hessian_bytes() * 10 < sum(p.numel() for p in params.values()) * 4  # factors, not m x n


def quadratic(a_diag):
    return lambda ts: 0.5 * sum((a_diag[n] * ts[n] ** 2).sum() for n in ts)


@pytest.mark.parametrize("factored", [True, False])
def test_hessian_approaches_true_diagonal(factored, estimator="unbiased"):
    """L = ½ Σ a θ² (diagonal Hessian a, rank-1 for the 2-D tensor so factors can hold it exactly)."""
    a = {"w": torch.outer(torch.tensor([1.0, 4.0]), torch.tensor([0.5, 1.0, 2.0])), "b": torch.tensor([0.3, 3.0])}
    block = resident_block("layers.0", {"w": torch.zeros(2, 3), "b": torch.zeros(2)})
    opt = HiZOOL(seed=1, lr=0.0, eps=1e-2, alpha=2e-3, factored=factored, h_min=1e-3, h_max=1e3,
                 estimator=estimator)
    tail = {n: torch.zeros_like(t) for n, t in a.items()}
    loss, steps = quadratic(a), 6000
    for t in range(steps):
        opt.begin_step(t)
        opt.on_resident(block)
        opt.finish_step([torch.tensor(float(loss(opt.pass_tensors(block, p)))) for p in range(3)])
        if t >= steps // 2:
            for n in tail:
                tail[n] += opt.hessian(n, a[n], torch.empty_like(a[n])) / (steps - steps // 2)
    for n in a:
        torch.testing.assert_close(tail[n], a[n], rtol=0.15, atol=0.05)


@pytest.mark.parametrize("alpha", [0.0, 1e-8, 1e-3, 0.5, 1.0])
def test_hessian_finite_and_clamped_at_any_alpha(alpha):
    a = {"w": torch.full((3, 4), 1e6), "b": torch.full((4,), 1e-6)}  # huge and tiny curvatures
    block = resident_block("layers.0", {"w": torch.randn(3, 4), "b": torch.randn(4)})
    opt = HiZOOL(seed=2, lr=1e-9, eps=1e-3, alpha=alpha)
    quadratic_steps(opt, block, quadratic(a), 30)
    for n, t in block.tensors.items():
        h = opt.hessian(n, t, torch.empty_like(t))
        assert torch.isfinite(t).all() and torch.isfinite(h).all() and (h >= 1e-4).all() and (h <= 1e4).all()
