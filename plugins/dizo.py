"""DiZO: MeZO steps plus periodic zeroth-order learning of per-layer projections toward the pre-trained weights.

Paper: "Harmony in Divergence: Towards Fast, Accurate, and Memory-efficient Zeroth-order LLM Fine-tuning" (DiZO).
Every ``cycle`` steps, before the step, for each projected tensor ℓ (attention query and value weights by
default) with drift Δθ_ℓ = θ_ℓ − θ₀_ℓ and t_ℓ = ‖Δθ_ℓ‖:

* γ ← t (re-initialised every phase);
* ``iters`` times: u_ℓ = t_ℓ · n_ℓ, n ~ N(0, 1) per tensor (stream ``u<j>``); losses at γ ± μu, where the
  weights are θ₀ + γ/t · Δθ; ĝ = (L₊ − L₋) / (2μ); γ ← clip(γ − η_γ ĝ u, (1−τ)t, (1+τ)t);
* θ ← θ₀ + γ/t · Δθ.

θ₀ is read from the prepared block store (the read-only base the working copy started from): no copy of the
model is kept. Each iteration is one streamed phase with two forward passes on the step's batch, the final
projection one visit-only stream; the phase count is reported in the next step's metrics. With ``cycle=0``
(no projection phase) or τ = 0 (γ = t: the projection is the identity and is skipped) it is MeZO exactly.

Defaults: lr 4e-5 (MeZO's) with η_γ = 1. Here u is relative to the drift (u = t · n), so the expected step on γ
is η_γ · t² times ∂L/∂γ and t grows with lr; 4e-5 / 1 keeps about the γ step of the earlier 1e-5 / 10 while the
ZO steps get MeZO's tuned rate, and it tuned best on the demo task (docs/methods.md, "Tuned benchmark").
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from zoedge.optim.api import BlockVisitor, Resident, Update, register_optimizer
from zoedge_plugins.mezo import MeZO


class _Projection(BlockVisitor):
    """One phase of projection learning: iteration ``j`` (2 passes at γ ± μu), or the final write (no passes)."""

    def __init__(self, owner: DiZO, j: int | None) -> None:
        self.owner, self.j = owner, j
        self.passes = 0 if j is None else 2

    def on_resident(self, block: Resident) -> None:
        o = self.owner
        names = [n for n in block.tensors if o.projects(n, block.tensors[n])]
        if not names:
            return
        base = block.workspace("anchor")
        for n in names:
            block.stored(n, base[n])  # θ₀
            if self.j == 0:  # first iteration: the drift norms, γ = t
                norm = float(torch.linalg.vector_norm((block.tensors[n] - base[n]).float()))
                o.norm[n], o.gamma[n] = norm, norm
        if self.j is None:  # the final projection, skipped where it is the identity
            for n in names:
                t, g = o.norm.get(n, 0.0), o.gamma.get(n, 0.0)
                if t > 0 and g != t:
                    theta = block.tensors[n]
                    theta.sub_(base[n]).mul_(g / t).add_(base[n])
                    block.mark_dirty()

    def pass_tensors(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        o = self.owner
        base, out = block.workspace("anchor"), block.workspace("scratch")
        seen = dict(block.tensors)
        for n, theta in block.tensors.items():
            t = o.norm.get(n, 0.0)
            if t > 0 and o.projects(n, theta):
                g = o.gamma[n] + (o.mu if p == 0 else -o.mu) * o.direction(n, self.j)
                torch.sub(theta, base[n], out=out[n]).mul_(g / t).add_(base[n])
                seen[n] = out[n]
        return seen


@register_optimizer("dizo")
class DiZO(MeZO):
    """DiZO: MeZO plus periodic ZO learning of per-layer projections (gamma) toward the pre-trained weights.

    Args:
        lr: learning rate η of the ZO steps.
        eps: perturbation scale ε of the ZO steps.
        weight_decay: λ (not applied to 1-D tensors).
        cycle: steps between projection phases (0: never; DiZO is then MeZO).
        iters: ZO iterations of one projection phase (2 forward passes each).
        mu: perturbation scale μ of γ (relative: u is scaled by the drift norm).
        gamma_lr: learning rate η_γ of γ.
        tau: clip range of γ: [(1 − τ) t, (1 + τ) t].
        project: comma-separated name fragments of the projected weights (2-D only).

    Not replayable: the projection phases write the weights outside ``apply``, so its checkpoints hold the weights.
    """

    replayable = False

    def __init__(self, *, seed: int = 0, lr: float = 4e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 cycle: int = 50, iters: int = 10, mu: float = 0.2, gamma_lr: float = 1.0, tau: float = 0.2,
                 project: str = "q_proj,v_proj") -> None:
        if cycle < 0 or iters < 1 or mu <= 0 or not 0 <= tau < 1:
            raise ValueError(f"need cycle >= 0, iters >= 1, mu > 0 and 0 <= tau < 1; got cycle={cycle}, "
                             f"iters={iters}, mu={mu}, tau={tau}")
        super().__init__(seed=seed, lr=lr, eps=eps, weight_decay=weight_decay)
        self.cycle, self.iters, self.mu, self.gamma_lr, self.tau = cycle, iters, mu, gamma_lr, tau
        self.patterns = [p.strip() for p in project.split(",") if p.strip()]
        self.norm: dict[str, float] = {}    # t_ℓ of the current phase
        self.gamma: dict[str, float] = {}   # γ_ℓ of the current phase
        self.history: list[dict[str, float]] = []  # γ/t after each iteration of the last phase (for the log/tests)
        self._phase_passes = 0

    def projects(self, name: str, tensor: torch.Tensor) -> bool:
        return tensor.ndim == 2 and any(p in name for p in self.patterns)

    def direction(self, name: str, j: int | None) -> float:
        """u_ℓ of iteration ``j``: t_ℓ · n, n ~ N(0, 1) (a pure function of seed, step, name and j)."""
        n = self.noise.normal((1,), self.t, name, f"u{j}")
        return self.norm[name] * float(n[0])

    def extra_phases(self, step: int) -> Iterator[BlockVisitor]:
        if not self.cycle or step == 0 or step % self.cycle:
            return
        self.t = step  # the directions' step
        self.norm, self.gamma, self.history = {}, {}, []
        for j in range(self.iters):
            yield _Projection(self, j)
        yield _Projection(self, None)

    def finish_phase(self, phase: BlockVisitor, losses: Sequence[torch.Tensor]) -> None:
        assert isinstance(phase, _Projection)
        self._phase_passes += phase.passes
        if phase.j is None:
            return
        ghat = (float(losses[0]) - float(losses[1])) / (2 * self.mu)
        for n, t in self.norm.items():
            if t > 0:
                g = self.gamma[n] - self.gamma_lr * ghat * self.direction(n, phase.j)
                self.gamma[n] = min(max(g, (1 - self.tau) * t), (1 + self.tau) * t)
        self.history.append({n: self.gamma[n] / t for n, t in self.norm.items() if t > 0})

    def end_step(self, losses: Sequence[torch.Tensor]) -> Update:
        update = super().end_step(losses)
        if self._phase_passes:
            update.metrics["projection_passes"] = float(self._phase_passes)
            self._phase_passes = 0
        return update
