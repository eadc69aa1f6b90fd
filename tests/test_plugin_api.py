"""The plugin API expresses the other seed methods: a low-rank functional perturbation (HZO-like)
and three passes per step (HiZOO-like), proven with test-only toy plugins against resident references."""
from __future__ import annotations

import torch
from torch.func import functional_call

import zoedge
from zoedge.optim.api import Update, ZOOptimizer
from zoedge.optim.lowrank import LowRankPerturbed
from zoedge.noise.source import NoiseSource
from zoedge.train.batching import collate
from zoedge.train.trainer import _loss_passes, batch_indices
from tests.test_mezo import resident_loss
from tests.tiny import CharTokenizer, save_tiny, toy_examples

R, LR, EPS, SEED, STEPS, BS = 2, 1e-3, 1e-2, 5, 6, 4


def factors(noise, t, name, shape):
    m, n = shape
    return noise.normal((m, R), t, name, "U"), noise.normal((n, R), t, name, "V")


class ToyLowRank(ZOOptimizer):
    """Low-rank ZO-SGD: perturb 2-D weights by ±ε U Vᵀ without forming U Vᵀ in the forward; 1-D frozen."""

    def __init__(self, *, seed: int = 0, lr: float = LR, eps: float = EPS) -> None:
        super().__init__(seed=seed, lr=lr)
        self.eps = eps

    def perturb(self, block, p):
        sign = 1.0 if p == 0 else -1.0
        out = {}
        for name, w in block.tensors.items():
            if w.ndim == 2:
                u, v = factors(self.noise, self.t, name, w.shape)
                out[name] = LowRankPerturbed(w, u, v, sign * self.eps)
            else:
                out[name] = w
        return out

    def end_step(self, losses):
        g = float(losses[0] - losses[1]) / (2 * self.eps)
        return Update({"g": g, "lr": self.lr}, {"projected_grad": g})

    def apply(self, block, update):
        for name, w in block.tensors.items():
            if w.ndim == 2:
                u, v = factors(self.noise, update.step, name, w.shape)
                w.sub_(update["lr"] * update["g"] * (u @ v.T) / R)


class ToyThreePass(ToyLowRank):
    """Pass 0 unperturbed (L0, as HiZOO needs), passes 1/2 at ±ε U Vᵀ."""

    passes = 3

    def perturb(self, block, p):
        return block.tensors if p == 0 else super().perturb(block, p - 1)

    def end_step(self, losses):
        self.l0 = float(losses[0])
        return super().end_step(losses[1:])


def run_streamed(opt, store, examples):
    model = zoedge.load(store)
    losses = []
    for t in range(STEPS):
        batch = collate(CharTokenizer(), [examples[i] for i in batch_indices(len(examples), BS, SEED, t)])
        opt.begin_step(t)
        ls = [l for l, _ in _loss_passes(model, opt, batch)]
        losses.append([float(x) for x in ls])
        opt.finish_step(ls)
    model.run(opt)
    opt.flushed()
    return losses, model.state_dict()


def run_resident(model, examples, three):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    noise = NoiseSource(SEED)
    losses = []
    with torch.no_grad():
        for t in range(STEPS):
            batch = collate(CharTokenizer(), [examples[i] for i in batch_indices(len(examples), BS, SEED, t)])
            uv = {n: factors(noise, t, n, p.shape) for n, p in params.items() if p.ndim == 2}
            step = [float(resident_loss(model, params, batch))] if three else []
            for sign in (1.0, -1.0):
                pert = {n: (p + sign * EPS * uv[n][0] @ uv[n][1].T) if n in uv else p for n, p in params.items()}
                step.append(float(resident_loss(model, pert, batch)))
            g = (step[-2] - step[-1]) / (2 * EPS)
            for n, (u, v) in uv.items():
                params[n].sub_(LR * g * (u @ v.T) / R)
            losses.append(step)
    return losses, params


def test_lowrank_and_three_pass_toys_match_resident(tmp_path):
    model = save_tiny("llama", tmp_path / "hf")
    zoedge.prepare(tmp_path / "hf", tmp_path / "store", progress=False, log=lambda s: None)
    ex = toy_examples()
    for cls, three in ((ToyLowRank, False), (ToyThreePass, True)):
        got, state = run_streamed(cls(seed=SEED), tmp_path / "store", ex)
        ref, params = run_resident(model, ex, three)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
        for n, p in params.items():
            torch.testing.assert_close(state[n], p, rtol=1e-5, atol=1e-6)
        assert cls.passes == (3 if three else 2)


def test_three_pass_l0_is_the_unperturbed_loss(tmp_path):
    save_tiny("opt", tmp_path / "hf")
    zoedge.prepare(tmp_path / "hf", tmp_path / "store", progress=False, log=lambda s: None)
    ex = toy_examples()
    model = zoedge.load(tmp_path / "store")
    batch = collate(CharTokenizer(), ex[:BS])
    plain = float(_loss_passes(model, zoedge.BlockVisitor(), batch)[0][0])
    opt = ToyThreePass(seed=SEED)
    opt.begin_step(0)
    ls = _loss_passes(model, opt, batch)
    opt.finish_step([l for l, _ in ls])
    assert opt.l0 == plain and float(ls[1][0]) != plain


def test_lowrank_perturbed_linear_never_materializes():
    base, u, v = torch.randn(6, 5), torch.randn(6, R), torch.randn(5, R)
    w = LowRankPerturbed(base, u, v, 0.5)
    called = []
    orig = LowRankPerturbed.materialize
    LowRankPerturbed.materialize = lambda self: called.append(1) or orig(self)
    try:
        y = functional_call(torch.nn.Linear(5, 6), {"weight": w, "bias": torch.zeros(6)}, (torch.randn(3, 5),))
    finally:
        LowRankPerturbed.materialize = orig
    assert not called and type(y) is torch.Tensor
