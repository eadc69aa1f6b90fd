"""MeZO: zeroth-order SGD with SPSA gradient estimates (*Fine-Tuning Language Models with Just Forward Passes*).

Per step and direction k < q: z_k ~ N(0, I) per tensor (noise stream ``z<k>``),
two passes θ ± εz_k, projected gradient g_k = (L₊ − L₋) / (2ε). The update
θ ← θ − η ( (1/q) Σ_k g_k z_k + λθ ) is applied lazily when the block is next
resident (λ skipped for 1-D tensors: biases and norm weights).

Noise: ``noise=gaussian`` (default), ``rademacher`` (±1) or ``pool`` (windows of one pre-drawn pool: no
per-step draw, no noise workspace); their statistics are in :mod:`zoedge.noise.source`.

Precision: the update is computed in the stored dtype. With a bf16/fp16 store,
``stochastic_rounding=True`` computes it in fp32 and rounds stochastically
(noise stream ``sr``) so tiny updates are not lost on average.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from zoedge.optim.api import NOISE_KINDS, Fill, Resident, Update, ZOOptimizer, make_noise, register_optimizer


def mezo_update_(theta: Any, directions: Iterable[tuple[Any, float]], q: int, lr: float, weight_decay: float) -> None:
    """θ ← θ − lr·((1/q) Σ_k g_k z_k + λθ), in place, in this exact op order (the tests' reference re-uses it).

    Args:
        theta: the weight (or an fp32 copy of it), updated in place; or a block's update part
            (:class:`~zoedge.optim.api.UpdatePart`, whose ``add_`` also takes a block's noise).
        directions: (z_k, g_k) pairs of the step that produced the update (tensors, or block noises for a
            part); may be a generator that draws each z_k just before it is needed.
        q: number of directions.
        lr: that step's learning rate.
        weight_decay: λ (0 for biases / norm weights).
    """
    if weight_decay:
        theta.mul_(1.0 - lr * weight_decay)
    for z, g in directions:
        theta.add_(z, alpha=-lr * g / q)


def stochastic_round_(out: torch.Tensor, value: torch.Tensor, uniform: torch.Tensor) -> None:
    """Round fp32 ``value`` into bf16/fp16 ``out``, up with probability equal to the fraction of the gap.

    Args:
        out: low-precision destination.
        value: fp32 values.
        uniform: U[0, 1) noise shaped like ``value``.
    """
    down = value.to(out.dtype)
    toward = torch.where(value >= down.float(), torch.full_like(down, float("inf")), torch.full_like(down, float("-inf")))
    up = torch.nextafter(down, toward)
    gap = (up.float() - down.float()).abs().clamp_min(torch.finfo(torch.float32).tiny)
    out.copy_(torch.where(uniform < (value - down.float()).abs() / gap, up, down))


@register_optimizer("mezo")
class MeZO(ZOOptimizer):
    """MeZO: ZO-SGD with q-direction SPSA, lazy updates, weight decay off for biases/norms.

    Args:
        lr: learning rate η (default 4e-5: tuned for the out-of-the-box SmolLM2-135M demo run of 30 steps; the paper uses
            1e-6 / 1e-7 for 13B models).
        eps: perturbation scale ε.
        weight_decay: λ (decoupled from the ZO estimate; not applied to 1-D tensors).
        q: number of random directions per step (2q passes per residency).
        stochastic_rounding: round bf16/fp16 updates stochastically instead of to nearest.
        noise: the direction noise: gaussian (N(0, 1)), rademacher (±1) or pool (windows of one pre-drawn pool,
            no per-step draw); statistics in zoedge/noise/source.py.

    Replayable (``replayable = True``): a checkpoint may hold the log of updates instead of the weights
    (``--checkpoint-weights updates``); subclasses that change weights elsewhere set it back to False.
    """

    #: its weights are the base after ``apply`` of each logged update: checkpoints may hold the updates only
    #: (``apply`` reads the update and options fixed at construction; noise is regenerated from (seed, step))
    replayable = True
    #: what a pass sees is θ, a fresh tensor or workspace ``scratch``: the layers may run concurrently
    concurrent = True

    def __init__(self, *, seed: int = 0, lr: float = 4e-5, eps: float = 1e-3, weight_decay: float = 0.0, q: int = 1,
                 stochastic_rounding: bool = False, noise: str = "gaussian") -> None:
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if q < 1:
            raise ValueError(f"q must be >= 1, got {q}")
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_KINDS)}, got {noise!r}")
        super().__init__(seed=seed, lr=lr, weight_decay=weight_decay)
        self.noise = make_noise(noise, seed)
        self.eps, self.q, self.stochastic_rounding = eps, q, stochastic_rounding
        self.passes = 2 * q

    def z(self, step: int, name: str, k: int) -> Fill:
        """Direction ``k``'s noise for tensor ``name`` at ``step`` (any range of it): every draw of a tensor's z,
        in the passes and in the update, goes through here, so they are the same numbers however they are formed."""
        return self.noise.draw(step, name, f"z{k}")

    def draw(self, block: Resident) -> None:
        """z_k for this step, once per residency, read by the +ε and −ε passes: only the directions this rank
        evaluates (direction-split data parallel)."""
        for k in filter(self.evaluates, range(self.q)):
            block.noise(f"z{k}", lambda name, k=k: self.z(self.t, name, k))

    def perturb(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        k, minus = divmod(p, 2)
        alpha = -self.eps if minus else self.eps
        return {name: block.perturbed(name, f"z{k}", alpha) for name in block.tensors}

    def direction_passes(self) -> list[list[int]] | None:
        """Direction k's passes: 2k (θ + εz_k) and 2k + 1 (θ − εz_k); None for a subclass with other passes."""
        return [[2 * k, 2 * k + 1] for k in range(self.q)] if self.passes == 2 * self.q else None

    def end_step(self, losses: Sequence[torch.Tensor]) -> Update:
        ls = [float(x) for x in losses]
        gs = [(ls[2 * k] - ls[2 * k + 1]) / (2 * self.eps) for k in range(self.q)]
        group = self.param_groups[0]
        return Update({"g": gs, "lr": float(group["lr"]), "weight_decay": float(group["weight_decay"])},
                      {"projected_grad": sum(gs) / len(gs)})

    def apply(self, block: Resident, update: Update) -> None:
        """θ ← θ − lr((1/q) Σ g_k z_k + λθ), part by part, the z_k of the update's step drawn again."""
        lr, gs, q = update["lr"], update["g"], self.q
        zs = [block.noise(f"z{k}", lambda name, k=k: self.z(update.step, name, k)) for k in range(q)]
        for part in block.parts():
            wd = update["weight_decay"] if part.ndim >= 2 else 0.0
            if self.stochastic_rounding and part.tensor.dtype in (torch.float16, torch.bfloat16):
                value = part.tensor.float()  # fp32 master of this part for the update (allocates; SR path only)
                mezo_update_(value, ((part.noise(z), g) for z, g in zip(zs, gs)), q, lr, wd)
                uniform = self.noise.uniform_at_(torch.empty_like(value), update.step, part.name, "sr", part.start,
                                                 part.total)
                stochastic_round_(part.tensor, value, uniform)
            else:
                mezo_update_(part, zip(zs, gs), q, lr, wd)
