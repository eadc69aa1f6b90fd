"""LoHO: a low-order hybrid of MeZO (shallow blocks) and a first-order optimizer (deep blocks).

Paper: "Towards Efficient Low-order Hybrid Optimizer for Language Model Fine-tuning" (LoHO).

* ``mode=inter`` (Z+F): the deepest ``fo_layers`` decoder blocks stay resident and are trained by SGD/AdamW
  (the framework's first-order blocks); the others run MeZO. Per step: pass 0 unperturbed (autograd reaches
  only the FO blocks), passes 1/2 at θ ± εz on the ZO blocks (FO blocks unperturbed). ZO and FO learning rates
  are separate: the ZO lr is orders of magnitude below the FO lr (the paper: 1e-7 vs 1e-4 with SGD on OPT-13B;
  its 1e-12 ZO lr for the Adam variant switches ZO off in practice and is not a default here).
* ``mode=intra``: in the deepest ``fo_layers`` blocks a random fraction ``intra_p`` of each weight matrix's
  entries is trained first-order as a sparse delta Δ (gradient by a sampled dense-dense product,
  :mod:`zoedge.optim.sparse_delta`; memory linear in ``intra_p``), the rest by MeZO (z is zero on the FO
  entries). Δ is merged into the streamed weight at the block's next residency, with the lazy ZO update.
* ``fo_layers=auto``: the most blocks whose FO memory (weights or Δ, grads, optimizer state, indices) fits
  ``fo_budget_mb``.

With 0 FO layers it is MeZO, exactly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from zoedge.optim.api import (BlockEntry, Fill, FOSettings, Resident, SparseDeltaWeight, Update, dtype_of,
                              layer_index, register_optimizer, sample_entries, stream_seed)
from zoedge_plugins.mezo import MeZO

#: optimizer-state bytes per trained element, in units of the element's own bytes
STATE_FACTOR = {"sgd": 0.0, "adamw": 2.0, "adamw8bit": 0.5}


@register_optimizer("loho")
class LoHO(MeZO):
    """LoHO: MeZO on shallow blocks + SGD/AdamW on the deepest (inter-layer) or on a fraction of their entries.

    Args:
        lr: ZO learning rate (MeZO blocks / entries).
        eps: perturbation scale ε.
        weight_decay: ZO weight decay λ (not applied to 1-D tensors).
        fo_layers: number of deepest decoder blocks trained first-order, or "auto" (the most that fit fo_budget_mb).
        mode: "inter" (whole FO blocks) or "intra" (a fraction intra_p of each FO block's weight matrices).
        intra_p: intra mode: fraction of each weight matrix's entries trained first-order.
        fo_optimizer: sgd, adamw or adamw8bit (bitsandbytes).
        fo_lr: first-order learning rate.
        fo_weight_decay: first-order weight decay (inter mode).
        fo_budget_mb: memory budget of the first-order part for fo_layers=auto (MiB).

    Not replayable: first-order blocks and sparse deltas are trained outside ``apply``, so its checkpoints hold
    the weights.
    """

    replayable = False

    def __init__(self, *, seed: int = 0, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 fo_layers: str = "2", mode: Literal["inter", "intra"] = "inter", intra_p: float = 0.1,
                 fo_optimizer: Literal["sgd", "adamw", "adamw8bit"] = "sgd", fo_lr: float = 1e-4,
                 fo_weight_decay: float = 0.0, fo_budget_mb: float = 0.0) -> None:
        super().__init__(seed=seed, lr=lr, eps=eps, weight_decay=weight_decay)
        if fo_layers != "auto" and not (fo_layers.isdigit()):
            raise ValueError(f"fo_layers must be a number of blocks or 'auto', got {fo_layers!r}")
        if fo_layers == "auto" and fo_budget_mb <= 0:
            raise ValueError("fo_layers=auto needs a memory budget: give fo_budget_mb (MiB) > 0")
        if not 0 < intra_p <= 1:
            raise ValueError(f"intra_p must be in (0, 1], got {intra_p}")
        self.fo_layers, self.mode, self.intra_p = fo_layers, mode, intra_p
        self.fo_optimizer, self.fo_lr, self.fo_weight_decay, self.fo_budget_mb = (fo_optimizer, fo_lr,
                                                                                  fo_weight_decay, fo_budget_mb)
        self.chosen: list[str] = []                       # FO blocks (both modes)
        self.entries: dict[str, torch.Tensor] = {}        # intra: tensor name -> flat indices (rows * n + cols)
        self.rows: dict[str, torch.Tensor] = {}
        self.cols: dict[str, torch.Tensor] = {}
        self.delta: dict[str, torch.Tensor] = {}          # intra: tensor name -> Δ (FO-trained leaf)
        self._shapes: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------ FO choice
    def _fo_bytes(self, block: BlockEntry) -> float:
        """First-order memory of one block: weights (intra: the grad pass's copy, and Δ), grads, optimizer state
        (and Δ's indices)."""
        total = 0.0
        for t in block.tensors:
            size = dtype_of(t.dtype).itemsize
            n = 1
            for d in t.shape:
                n *= d
            if self.mode == "intra":
                total += n * size  # the grad pass's copy of the block's weights (see perturb)
                if len(t.shape) == 2:
                    total += round(self.intra_p * n) * (size * (2 + STATE_FACTOR[self.fo_optimizer]) + 16)
            else:
                total += n * size * (2 + STATE_FACTOR[self.fo_optimizer])
        return total

    def fo_blocks(self, blocks: Sequence[BlockEntry]) -> list[str]:
        layers = [b for b in blocks if layer_index(b.name) is not None]
        if self.fo_layers == "auto":
            budget, k = self.fo_budget_mb * 2**20, 0
            for b in reversed(layers):
                budget -= self._fo_bytes(b)
                if budget < 0:
                    break
                k += 1
        else:
            k = min(int(self.fo_layers), len(layers))
        self.chosen = [b.name for b in layers[len(layers) - k:]] if k else []
        if self.chosen:
            self.passes, self.fo_pass = 3, 0
        if self.mode == "intra":
            for b in blocks:
                if b.name in self.chosen:
                    self._shapes.update({t.name: tuple(t.shape) for t in b.tensors if len(t.shape) == 2})
            return []
        return list(self.chosen)

    def fo_parameters(self, device: torch.device) -> dict[str, torch.Tensor]:
        for name, shape in self._shapes.items():
            gen = torch.Generator().manual_seed(stream_seed(self.seed, 0, name, "fo_entries"))
            rows, cols = sample_entries(shape, self.intra_p, gen)
            self.rows[name], self.cols[name] = rows.to(device), cols.to(device)
            self.entries[name] = (rows * shape[1] + cols).to(device)
            self.delta[name] = torch.zeros(rows.numel(), device=device, requires_grad=True)
        return {f"delta.{n}": d for n, d in self.delta.items()}

    def fo_settings(self) -> FOSettings:
        return FOSettings(self.fo_optimizer, self.fo_lr, self.fo_weight_decay)

    # ---------------------------------------------------------------- hooks
    def z(self, step: int, name: str, k: int) -> Fill:
        """MeZO's z with the FO entries zeroed (they are not ZO-perturbed)."""
        fill, entries = super().z(step, name, k), self.entries.get(name)
        if entries is None:
            return fill

        def masked(out: torch.Tensor, start: int, total: int) -> torch.Tensor:
            fill(out, start, total)
            inside = entries[(entries >= start) & (entries < start + out.numel())] - start
            out.view(-1)[inside] = 0
            return out
        return masked

    def perturb(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        if not self.chosen:
            return super().perturb(block, p)
        if p > 0:
            return super().perturb(block, p - 1)
        if block.name not in self.chosen:  # intra: the FO entries' Δ on the unperturbed pass
            return block.tensors
        # Autograd keeps this pass's weights until the backward after the head, but the block's slot is
        # refilled by later blocks before then: the FO block's grad pass reads a private copy (block-sized,
        # freed after the backward; counted in _fo_bytes).
        base = {n: t.clone() for n, t in block.tensors.items()}
        return {n: SparseDeltaWeight(t, self.rows[n], self.cols[n], self.delta[n]) if n in self.delta else t
                for n, t in base.items()}

    def end_step(self, losses: Sequence[torch.Tensor]) -> Update:
        return super().end_step(losses[1:] if self.chosen else losses)

    def apply(self, block: Resident, update: Update) -> None:
        """MeZO's update (its z zeroed on the FO entries, see :meth:`z`), then Δ merged into the weight."""
        super().apply(block, update)
        for name in self.delta.keys() & block.tensors.keys():
            with torch.no_grad():
                block.tensors[name].view(-1).index_add_(0, self.entries[name],
                                                        self.delta[name].to(block.tensors[name].dtype))
                self.delta[name].zero_()
