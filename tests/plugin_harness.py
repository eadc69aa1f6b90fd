"""Shared drivers for plugin tests, now in :mod:`zoedge.testing` (installed with the package)."""
from __future__ import annotations

from zoedge import testing
from zoedge.testing import Workspaces, batches, quadratic_steps, resident_block  # noqa: F401


def zo_sgd_(theta, directions, q, lr, weight_decay):
    """The reference ZO-SGD update, written from MeZO's formula θ ← θ − lr·((1/q) Σ_k g_k z_k + λθ), in place and in
    the plugins' op order (decay first, then each direction) so that streamed == reference is bit for bit. The
    tests' references use this, never a plugin's own helpers: a bug shared by both sides would pass."""
    if weight_decay:
        theta.mul_(1.0 - lr * weight_decay)
    for z, g in directions:
        theta.add_(z, alpha=-lr * g / q)


def run_streamed(opt, store, examples, steps, bs, seed):
    """``steps`` optimizer steps on the streamed model, then a flush; returns (per-step pass losses, weights)."""
    return testing.run_streamed(opt, store, batches(examples, steps, bs, seed))
