"""A throw-away installed distribution declaring an optimizer plugin, for tests.

``make_toy_dist(root)`` writes ``root/toyzo/__init__.py`` (the plugin module)
and ``root/toyzo-0.1.dist-info/`` (METADATA + entry_points.txt declaring
``toy = toyzo:Toy`` in the ``zoedge.optimizers`` group). Put ``root`` on
``sys.path`` (``monkeypatch.syspath_prepend(root)``) or ``PYTHONPATH`` and
``importlib.metadata`` finds it like any installed distribution.

Remember that imported modules stay in ``sys.modules``: give each test its own
module name, or drop the module afterwards (see ``forget_modules``).
"""
from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path

#: Toy ZO-signSGD plugin: two-point estimate g, lazy update θ -= lr·sign(g)·z (or lr·g·z).
TOY_SOURCE = textwrap.dedent('''
    """Toy plugin for tests: two-point ZO estimate, sign-SGD update."""
    from __future__ import annotations

    import math
    from typing import Literal

    import torch

    from zoedge.optim.api import Update, ZOOptimizer


    class Toy(ZOOptimizer):
        """Toy ZO-signSGD: g = (L(θ+εz) - L(θ-εz)) / 2ε, update θ -= lr·sign(g)·z.

        Args:
            seed: run seed (from the trainer).
            lr: step size.
            eps: perturbation scale ε.
            sign: update with sign(g) instead of g.
            schedule: "constant" lr, or "sqrt" (lr / sqrt(t + 1)).
            note: free text, unused.
        """

        passes = 2

        def __init__(self, *, seed: int = 0, lr: float = 1e-3, eps: float = 1e-3, sign: bool = True,
                     schedule: Literal["constant", "sqrt"] = "constant", note: str | None = None) -> None:
            super().__init__(seed=seed, lr=lr)
            self.eps, self.use_sign, self.schedule, self.note = eps, sign, schedule, note
            self.z: dict[str, torch.Tensor] = {}

        def _z(self, t: torch.Tensor, step: int, name: str) -> torch.Tensor:
            return self.noise.normal(tuple(t.shape), step, name, "z0", dtype=t.dtype, device=t.device)

        def draw(self, block) -> None:
            self.z = {n: self._z(block.tensors[n], self.t, n) for n in sorted(block.writable)}

        def perturb(self, block, p: int):
            s = self.eps if p == 0 else -self.eps
            return {n: (t + s * self.z[n] if n in self.z else t) for n, t in block.tensors.items()}

        def end_step(self, losses):
            g = float((losses[0].float() - losses[1].float()) / (2 * self.eps))
            lr = self.lr / math.sqrt(self.t + 1) if self.schedule == "sqrt" else self.lr
            return Update({"coef": lr * (math.copysign(1.0, g) if self.use_sign else g)}, {"g": g})

        def apply(self, block, update) -> None:
            for n in sorted(block.writable):
                block.tensors[n].sub_(update["coef"] * self._z(block.tensors[n], update.step, n))
''')


def make_toy_dist(root: Path, name: str = "toyzo", plugin_source: str | None = TOY_SOURCE, *,
                  version: str = "0.1", entry_points: Mapping[str, str] | None = None) -> Path:
    """Write a distribution ``name`` with package ``name`` under ``root``; returns its ``.dist-info`` dir.

    Args:
        root: a directory to put on ``sys.path``.
        name: distribution and package name.
        plugin_source: text of ``<name>/__init__.py``; ``None`` writes no package (a dangling entry point).
        version: distribution version.
        entry_points: ``{plugin name: "module:attr"}`` (default ``{"toy": "<name>:Toy"}``).
    """
    root = Path(root)
    if plugin_source is not None:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text(plugin_source)
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    eps = entry_points if entry_points is not None else {"toy": f"{name}:Toy"}
    (info / "entry_points.txt").write_text(
        "[zoedge.optimizers]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    importlib.invalidate_caches()  # path finders and importlib.metadata cache directory listings
    return info


def forget_modules(names: Iterable[str]) -> None:
    """Drop modules (and their submodules) from ``sys.modules`` so a later test re-imports them."""
    for mod in list(sys.modules):
        if any(mod == n or mod.startswith(n + ".") for n in names):
            del sys.modules[mod]
