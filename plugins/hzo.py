"""HZO: low-rank ZO perturbations with stable (periodically resampled) V, and a first-order tail.

Paper: "Hybrid zeroth-order with low-rank stable sampling" (HZO, seed 001 of the design notes; Algorithm 1).
For each 2-D weight X (m×n) of a ZO block: U ~ N(0,1)^{m×r} fresh every step (stream ``U``), V ~ N(0,1)^{n×r}
redrawn when t mod ν = 0 (stream ``V``, keyed by the period's first step). Passes see X ± ε U Vᵀ computed as
``x Xᵀ ± ε (x V) Uᵀ`` (:class:`~zoedge.optim.lowrank.LowRankPerturbed`): no m×n noise is ever formed.
g = (L₊ − L₋) / (2ε); X ← X − η g U Vᵀ / r. 1-D tensors: a dense Gaussian perturbation (``vector=dense``) or
frozen. The last ``fo_layers`` decoder blocks are trained first-order (SGD/AdamW) on the resample steps only
(t mod ν = 0: one extra unperturbed pass, the ZO blocks frozen for it).

Factor mode (``factors=merge``, the default): V is fixed within a period, so the period's updates sum to
A Vᵀ with A = −η Σ_t g_t U_t / r (m×r, fp32, plugin state); 1-D updates go to a small dense delta. Passes see
X + (A ± εU) Vᵀ, still rank r. Nothing is written to the base per step; the factors are merged into the base
once at the end of each period (one write-back per block per period) and at every flush (eval, checkpoint,
export). ``factors=off`` applies each step's update to the base (dense, written back every step).

Every merged period's A and V are also kept (CPU, fp32; plugin state): the run's whole change of each 2-D tensor
is Σ_p A_p V_pᵀ = [A_1 … A_K] [V_1 … V_K]ᵀ, an exact LoRA adapter of rank r·K (:meth:`HZO.lora_factors`, written
by ``finetune`` to OUTPUT/adapter when nothing else changed: ``vector=frozen``, ``freeze=embed``, no first-order
tail).

Resume is bit-equal to an uninterrupted run with the same eval/save steps (a flush merges the factors).
Not yet: training a quantized base through the kept factors (they are merged into the base today).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from zoedge.optim.api import (BlockEntry, ConfigError, Fill, FOSettings, LowRankPerturbed, Resident, Update,
                              ZOOptimizer, layer_index, register_optimizer)


@register_optimizer("hzo")
class HZO(ZOOptimizer):
    """HZO: rank-r ZO perturbations U Vᵀ (V resampled every nu steps), factor-mode updates, first-order tail.

    Args:
        lr: ZO learning rate η.
        eps: perturbation scale ε.
        rank: r.
        nu: V is redrawn (and the first-order tail trained) every nu steps.
        vector: 1-D tensors (biases, norms): "dense" Gaussian perturbation or "frozen".
        factors: "merge" (keep the period's update as factors, merge once per period and at flushes) or "off".
        fo_layers: number of deepest decoder blocks trained first-order on the resample steps.
        fo_optimizer: sgd, adamw or adamw8bit (bitsandbytes).
        fo_lr: first-order learning rate.
        freeze: comma-separated name fragments of tensors left untouched (e.g. "embed"; for a LoRA export).

    Not replayable (``replayable`` stays False): factor merges at flushes and the first-order tail change the
    weights outside ``apply``, so its checkpoints hold the weights.
    """

    #: a pass sees θ, low-rank wrappers made per pass or workspace ``scratch``: the layers may run concurrently
    concurrent = True

    def __init__(self, *, seed: int = 0, lr: float = 1e-5, eps: float = 1e-3, rank: int = 4, nu: int = 50,
                 vector: Literal["dense", "frozen"] = "dense", factors: Literal["merge", "off"] = "merge",
                 fo_layers: int = 0, fo_optimizer: Literal["sgd", "adamw", "adamw8bit"] = "sgd",
                 fo_lr: float = 1e-4, freeze: str = "") -> None:
        if eps <= 0 or rank < 1 or nu < 1 or fo_layers < 0:
            raise ValueError(f"need eps > 0, rank >= 1, nu >= 1, fo_layers >= 0; got eps={eps}, rank={rank}, "
                             f"nu={nu}, fo_layers={fo_layers}")
        super().__init__(seed=seed, lr=lr)
        self.eps, self.rank, self.nu, self.vector, self.factors = eps, rank, nu, vector, factors
        self.fo_layers, self.fo_optimizer, self.fo_lr = fo_layers, fo_optimizer, fo_lr
        self.frozen = [f.strip() for f in freeze.split(",") if f.strip()]
        self.dense = factors == "off"  # factor mode writes the base only when it merges
        self.fo_pass = 0 if fo_layers else None
        self.a: dict[str, torch.Tensor] = {}   # factor mode: 2-D tensor -> A (m×r, fp32)
        self.d: dict[str, torch.Tensor] = {}   # factor mode: 1-D tensor -> dense delta (fp32)
        self.kept: dict[str, dict[str, torch.Tensor]] = {}  # merged periods: 2-D tensor -> {"A<p>"/"V<p>": CPU fp32}
        self.dense_merged = False  # a 1-D delta was merged (the change is not all factors)

    # ------------------------------------------------------------ schedule
    def period(self, step: int) -> int:
        return step - step % self.nu

    def fo_blocks(self, blocks: Sequence[BlockEntry]) -> list[str]:
        layers = [b.name for b in blocks if layer_index(b.name) is not None]
        return layers[len(layers) - min(self.fo_layers, len(layers)):] if self.fo_layers else []

    def fo_settings(self) -> FOSettings:
        return FOSettings(self.fo_optimizer, self.fo_lr)

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        resample = step % self.nu == 0
        self.passes = 3 if self.fo_layers and resample else 2
        self.fo_pass = 0 if self.passes == 3 else None

    # --------------------------------------------------------------- noise
    def _uv(self, name: str, w: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, n = w.shape
        u = self.noise.normal((m, self.rank), step, name, "U", device=w.device)
        v = self.noise.normal((n, self.rank), self.period(step), name, "V", device=w.device)
        return u, v

    def _trains(self, name: str, t: torch.Tensor) -> bool:
        if any(f in name for f in self.frozen):
            return False
        return t.ndim == 2 or self.vector == "dense"

    # --------------------------------------------------------------- hooks
    def z(self, step: int, name: str) -> Fill:
        """A 1-D tensor's dense noise (any range of it)."""
        return self.noise.draw(step, name, "z0")

    def draw(self, block: Resident) -> None:
        dense = [n for n, t in block.tensors.items() if t.ndim != 2 and self._trains(n, t)]
        block.noise("z0", lambda name: self.z(self.t, name), dense)

    def perturb(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        k = p - (self.passes - 2)          # with a first-order pass first: pass 0 is unperturbed
        sign = 0.0 if k < 0 else (1.0 if k == 0 else -1.0)
        seen: dict[str, torch.Tensor] = {}
        for name, t in block.tensors.items():
            if not self._trains(name, t):
                seen[name] = t
            elif t.ndim == 2:
                u, v = self._uv(name, t, self.t)
                a = self.a.get(name)
                if a is None and sign == 0.0:
                    seen[name] = t
                    continue
                factor = u.mul_(sign * self.eps) if a is None else (a + sign * self.eps * u)
                seen[name] = LowRankPerturbed(t, factor.to(t.dtype), v.to(t.dtype), 1.0)
            else:
                base = t + self.d[name].to(t.dtype) if name in self.d else t  # 1-D: small
                seen[name] = block.perturbed(name, "z0", sign * self.eps, base) if sign \
                    else base
        return seen

    def end_step(self, losses: Sequence[torch.Tensor]) -> Update:
        lp, lm = (float(x) for x in losses[-2:])
        g = (lp - lm) / (2 * self.eps)
        return Update({"g": g, "lr": self.lr}, {"projected_grad": g})

    def apply(self, block: Resident, update: Update) -> None:
        c = -update["lr"] * update["g"]
        for name, t in block.tensors.items():
            if not self._trains(name, t):
                continue
            if t.ndim == 2:
                u, v = self._uv(name, t, update.step)
                if self.factors == "off":
                    t.addmm_(u.to(t.dtype), v.T.to(t.dtype), alpha=c / self.rank)
                else:
                    a = self.a.get(name)
                    if a is None:
                        a = self.a[name] = torch.zeros_like(u)
                    a.add_(u, alpha=c / self.rank)
            else:
                z = self.z(update.step, name)(block.buffer("z0", name), 0, t.numel())
                if self.factors == "off":
                    t.add_(z, alpha=c)
                else:
                    d = self.d.get(name)
                    if d is None:
                        d = self.d[name] = torch.zeros(t.shape, device=t.device)
                    d.add_(z, alpha=c)
        if self.factors != "off" and (update.step + 1) % self.nu == 0:
            self._merge(block, update.step)  # the period ends: V changes with the next step

    def on_flush(self, block: Resident) -> None:
        if self.factors != "off":
            self._merge(block, self.t)

    def _merge(self, block: Resident, step: int) -> None:
        """X ← X + A Vᵀ (and θ ← θ + d for 1-D); factors reset; the block is written back once."""
        changed = False
        for name, t in block.tensors.items():
            if (name in self.a or name in self.d) and name not in block.writable:
                raise ConfigError(name, "is stored quantized: HZO cannot merge its factors into it (keeping every "
                                  "period's factors to the end is not implemented)",
                                  "prepare the store with --quant none, or freeze it (--opt freeze=...)")
            if name in self.a:
                _, v = self._uv(name, t, step)
                a = self.a.pop(name)
                t.addmm_(a.to(t.dtype), v.T.to(t.dtype))
                kept, p = self.kept.setdefault(name, {}), self.period(step)
                kept[f"A{p}"] = kept[f"A{p}"] + a.cpu() if f"A{p}" in kept else a.cpu().clone()
                kept[f"V{p}"] = v.float().cpu()
                changed = True
            elif name in self.d:
                t.add_(self.d.pop(name).to(t.dtype))
                self.dense_merged = changed = True
        if changed:
            block.mark_dirty()

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each 2-D tensor's change as B = [A_1 … A_K], A = [V_1 … V_K]ᵀ over the merged periods (after a flush);
        ``{}`` when 1-D tensors or first-order blocks changed too, or with ``factors=off``."""
        if self.dense_merged or self.fo_layers or self.factors == "off":
            return {}
        out = {}
        for name, kept in self.kept.items():
            periods = sorted(int(k[1:]) for k in kept if k.startswith("A"))
            out[name] = (torch.cat([kept[f"A{p}"] for p in periods], dim=1),
                         torch.cat([kept[f"V{p}"] for p in periods], dim=1).T.contiguous())
        return out

    # --------------------------------------------------------------- state
    def plugin_state(self) -> dict[str, Any]:
        return {"a": self.a, "d": self.d, "kept": self.kept, "dense_merged": self.dense_merged}

    def load_plugin_state(self, state: Mapping[str, Any]) -> None:
        self.a = {k: v.clone() for k, v in state.get("a", {}).items()}
        self.d = {k: v.clone() for k, v in state.get("d", {}).items()}
        self.kept = {k: {p: v.clone() for p, v in kept.items()} for k, kept in state.get("kept", {}).items()}
        self.dense_merged = bool(state.get("dense_merged", False))
