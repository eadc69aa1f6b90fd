"""DiZO: no projection phase (or τ = 0) is MeZO; streamed == a resident DiZO written here; γ stays in its clip
range; θ₀ comes from the store."""
from __future__ import annotations

import pytest
import torch

import zoedge
from zoedge.noise.source import NoiseSource
from zoedge.train.trainer import TrainSettings, Trainer
from zoedge_plugins.dizo import DiZO
from zoedge_plugins.mezo import MeZO
from tests.plugin_harness import batches, zo_sgd_
from tests.test_mezo import resident_loss
from tests.tiny import CharTokenizer, toy_examples

STEPS, BS, LR, EPS, SEED = 7, 4, 5e-3, 1e-2, 5
CYCLE, ITERS, MU, GLR, TAU = 3, 3, 0.2, 1e5, 0.2  # a large η_γ: γ moves (and meets the clip) in 3 iterations


def run(store, out, opt):
    ex = toy_examples()
    t = Trainer(zoedge.load(store), CharTokenizer(), opt, ex, ex[:4], [],
                TrainSettings(steps=STEPS, batch_size=BS, seed=SEED), out, progress=False, log=lambda s: None)
    losses, gammas = [], []
    for _ in range(STEPS):
        m = t.train_step()
        losses.append(t.last_losses)
        if "projection_passes" in m:
            gammas.append(list(opt.history))
    t.flush()
    return losses, t.model.state_dict(), gammas


@pytest.mark.parametrize("kw", [{"cycle": 0}, {"cycle": CYCLE, "tau": 0.0}])
def test_no_projection_or_tau_zero_is_mezo(tiny, tmp_path, kw):
    _, store = tiny
    a = run(store, tmp_path / "a", DiZO(seed=SEED, lr=LR, eps=EPS, iters=ITERS, **kw))
    b = run(store, tmp_path / "b", MeZO(seed=SEED, lr=LR, eps=EPS))
    assert a[0] == b[0]
    for k in b[1]:
        assert torch.equal(a[1][k], b[1][k]), k


def resident_dizo(model, examples):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    proj = [n for n, p in params.items() if p.ndim == 2 and ("q_proj" in n or "v_proj" in n)]
    noise, losses = NoiseSource(SEED), []
    with torch.no_grad():
        for t, batch in enumerate(batches(examples, STEPS, BS, SEED)):
            if t and t % CYCLE == 0:
                norm = {n: float(torch.linalg.vector_norm(params[n] - base[n])) for n in proj}
                gamma = dict(norm)
                for j in range(ITERS):
                    u = {n: norm[n] * float(noise.normal((1,), t, n, f"u{j}")[0]) for n in proj}
                    ls = []
                    for s in (MU, -MU):
                        view = dict(params)
                        for n in proj:
                            view[n] = (params[n] - base[n]) * ((gamma[n] + s * u[n]) / norm[n]) + base[n]
                        ls.append(float(resident_loss(model, view, batch)))
                    ghat = (ls[0] - ls[1]) / (2 * MU)
                    for n in proj:
                        gamma[n] = min(max(gamma[n] - GLR * ghat * u[n], (1 - TAU) * norm[n]), (1 + TAU) * norm[n])
                for n in proj:
                    params[n] = (params[n] - base[n]) * (gamma[n] / norm[n]) + base[n]
            zs = {n: noise.normal(p.shape, t, n, "z0") for n, p in params.items()}
            step = [float(resident_loss(model, {n: torch.add(p, zs[n], alpha=a) for n, p in params.items()}, batch))
                    for a in (EPS, -EPS)]
            g = (step[0] - step[1]) / (2 * EPS)
            for n, p in params.items():
                zo_sgd_(p, [(zs[n], g)], 1, LR, 0.0)
            losses.append(step)
    return losses, params


def test_streamed_equals_resident_and_gamma_in_range(tiny, tmp_path):
    model, store = tiny
    opt = DiZO(seed=SEED, lr=LR, eps=EPS, cycle=CYCLE, iters=ITERS, mu=MU, gamma_lr=GLR, tau=TAU)
    got, state, gammas = run(store, tmp_path, opt)
    ref, params = resident_dizo(model, toy_examples())
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    for n, p in params.items():
        torch.testing.assert_close(state[n], p, rtol=1e-5, atol=1e-6)
    assert len(gammas) == 2 and all(len(h) == ITERS for h in gammas)
    ratios = [r for h in gammas for it in h for r in it.values()]
    assert ratios and all(1 - TAU - 1e-12 <= r <= 1 + TAU + 1e-12 for r in ratios)
    assert any(abs(r - 1) > 1e-3 for r in ratios)  # γ did move
    assert any(abs(abs(r - 1) - TAU) < 1e-9 for r in ratios)  # ... and was clipped
