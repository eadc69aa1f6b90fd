"""MeZO: zeroth-order SGD with SPSA gradient estimates (*Fine-Tuning Language Models with Just Forward Passes*).

Per step and direction k < q: z_k ~ N(0, I) per tensor (noise stream ``z<k>``),
two passes θ ± εz_k, projected gradient g_k = (L₊ − L₋) / (2ε). The update
θ ← θ − η ( (1/q) Σ_k g_k z_k + λθ ) is applied lazily when the block is next
resident (λ skipped for 1-D tensors: biases and norm weights).

Noise: ``noise=gaussian`` (default), ``rademacher`` (±1) or ``pool`` (windows of one pre-drawn pool: no
per-step draw, no noise workspace); their statistics are in :mod:`zoedge.optim.noise`.

Precision: the update is computed in the stored dtype. With a bf16/fp16 store,
``stochastic_rounding=True`` computes it in fp32 and rounds stochastically
(noise stream ``sr``) so tiny updates are not lost on average.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from zoedge.optim.api import Update, ZOOptimizer
from zoedge.optim.noise import NOISE_KINDS, make_noise
from zoedge.optim.registry import register_optimizer
from zoedge.runtime.perturbed import Fill
from zoedge.runtime.streamed import Resident


def mezo_update_(theta: torch.Tensor, directions: Iterable[tuple[torch.Tensor, float]], q: int, lr: float,
                 weight_decay: float) -> None:
    """θ ← θ − lr·((1/q) Σ_k g_k z_k + λθ), in place, in this exact op order (the tests' reference re-uses it).

    Args:
        theta: the weight (or an fp32 copy of it), updated in place.
        directions: (z_k, g_k) pairs of the step that produced the update; may be a generator that draws each
            z_k into one reused buffer just before it is needed.
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
            no per-step draw); statistics in zoedge/optim/noise.py.

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
        """Direction ``k``'s noise for tensor ``name`` at ``step`` (any row range of it; see
        :data:`zoedge.runtime.perturbed.Fill`): every draw of a tensor's z, in the passes and in the update, goes
        through here, so they are the same numbers however they are chunked."""
        return self.noise.draw(step, name, f"z{k}")

    def draw(self, block: Resident) -> None:
        """z_k for this step, once per residency, reused by the +ε and −ε passes (lean runtimes regenerate it): only
        the directions this rank evaluates (direction-split data parallel), and none when the noise source forms
        θ ± εz directly (e.g. ``noise=pool``)."""
        if self.noise.redraw_is_free:
            return
        for k in filter(self.evaluates, range(self.q)):
            block.noise(f"z{k}", lambda name, k=k: self.z(self.t, name, k))

    def perturb(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        k, minus = divmod(p, 2)
        alpha = -self.eps if minus else self.eps
        if self.noise.redraw_is_free and not block.lean:  # θ ± εz straight from the source, no noise workspace
            out = block.workspace("scratch")
            for name, theta in block.tensors.items():
                self.noise.add_(out[name], theta, alpha, self.t, name, f"z{k}")
            return out
        return {name: block.perturbed(name, f"z{k}", self.z(self.t, name, k), alpha) for name in block.tensors}

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
        """θ ← θ − lr((1/q) Σ g_k z_k + λθ), row chunk by row chunk (the whole tensor unless the runtime is lean);
        the step's z_k are drawn again: in workspace mode each z_k for the whole block at once (in parallel, into
        the workspace ``z<k>`` this step's ``draw`` fills next), lean one chunk at a time into scratch."""
        free = self.noise.redraw_is_free
        drawn = None if free or block.lean else [block.noise(f"z{k}", lambda name, k=k: self.z(update.step, name, k))
                                                 for k in range(self.q)]
        for name, theta in block.tensors.items():
            wd = update["weight_decay"] if theta.ndim >= 2 else 0.0
            sr = self.stochastic_rounding and theta.dtype in (torch.float16, torch.bfloat16)
            if free and not sr:  # same op order as mezo_update_, z read from the source
                if wd:
                    theta.mul_(1.0 - update["lr"] * wd)
                for k, g in enumerate(update["g"]):
                    self.noise.add_(theta, theta, -update["lr"] * g / self.q, update.step, name, f"z{k}")
                continue
            row = theta[0].numel() if theta.ndim > 1 else 1
            for a, b in block.chunks(name):
                part = theta[a:b] if theta.ndim else theta
                if drawn is not None:  # workspace mode: the whole tensor, drawn above
                    directions = ((z[name], g) for z, g in zip(drawn, update["g"]))
                else:
                    scratch = block.buffer("scratch", name, (a, b))
                    directions = ((self.z(update.step, name, k)(scratch, a * row, theta.numel()), g)
                                  for k, g in enumerate(update["g"]))
                if sr:
                    value = part.float()  # fp32 master of this part for the update (allocates; SR path only)
                    mezo_update_(value, directions, self.q, update["lr"], wd)
                    uniform = self.noise.uniform_at_(torch.empty_like(value), update.step, name, "sr", a * row,
                                                     theta.numel())
                    stochastic_round_(part, value, uniform)
                else:
                    mezo_update_(part, directions, self.q, update["lr"], wd)
