"""Shared drivers for plugin tests, now in :mod:`zoedge.testing` (installed with the package)."""
from __future__ import annotations

from zoedge import testing
from zoedge.testing import Workspaces, batches, quadratic_steps, resident_block  # noqa: F401


def run_streamed(opt, store, examples, steps, bs, seed):
    """``steps`` optimizer steps on the streamed model, then a flush; returns (per-step pass losses, weights)."""
    return testing.run_streamed(opt, store, batches(examples, steps, bs, seed))
