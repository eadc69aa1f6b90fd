"""Shared drivers for plugin tests: a streamed run through the real trainer hooks, and hand-made residents."""
from __future__ import annotations

import torch

import zoedge
from zoedge.runtime.streamed import Resident
from zoedge.train.batching import collate
from zoedge.train.trainer import _loss_passes, batch_indices
from tests.tiny import CharTokenizer


def zo_sgd_(theta, directions, q, lr, weight_decay):
    """The reference ZO-SGD update, written from MeZO's formula θ ← θ − lr·((1/q) Σ_k g_k z_k + λθ), in place and in
    the plugins' op order (decay first, then each direction) so that streamed == reference is bit for bit. The
    tests' references use this, never a plugin's own helpers: a bug shared by both sides would pass."""
    if weight_decay:
        theta.mul_(1.0 - lr * weight_decay)
    for z, g in directions:
        theta.add_(z, alpha=-lr * g / q)


def batches(examples, steps, bs, seed):
    tok = CharTokenizer()
    return [collate(tok, [examples[i] for i in batch_indices(len(examples), bs, seed, t)]) for t in range(steps)]


def run_streamed(opt, store, examples, steps, bs, seed):
    """``steps`` optimizer steps on the streamed model, then a flush; returns (per-step pass losses, weights)."""
    model = zoedge.load(store)
    losses = []
    for t, batch in enumerate(batches(examples, steps, bs, seed)):
        opt.begin_step(t)
        ls = [l for l, _ in _loss_passes(model, opt, batch)]
        losses.append([float(x) for x in ls])
        opt.finish_step(ls)
    model.run(opt)
    opt.flushed()
    return losses, model.state_dict()


class Workspaces:
    """The runtime's ``workspace`` for hand-made residents: one buffer per (key, tensor name)."""

    def __init__(self):
        self.bufs = {}

    def workspace(self, key, block):
        return {n: self.bufs.setdefault((key, n), torch.empty_like(t)) for n, t in block.tensors.items()}


def resident_block(name, tensors, ws=None):
    return Resident(name, 0, tensors, frozenset(tensors), runtime=ws or Workspaces())


def quadratic_steps(opt, block, loss_fn, steps):
    """Drive ``opt`` through its hooks on one hand-made block whose loss is ``loss_fn(tensors)``."""
    for t in range(steps):
        opt.begin_step(t)
        opt.on_resident(block)
        losses = [torch.tensor(float(loss_fn(opt.pass_tensors(block, p)))) for p in range(opt.passes)]
        opt.finish_step(losses)
    opt.on_resident(block)
    opt.flushed()
