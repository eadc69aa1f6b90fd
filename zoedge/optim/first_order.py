"""First-order blocks of hybrid methods (LoHO, HZO): resident, trained by a torch optimizer, counted.

The blocks a plugin names in ``fo_blocks`` are read once from the host tier
into device tensors with ``requires_grad`` and stay there. During a step the
runtime hands the block these tensors instead of its streamed copy: every pass
sees them unperturbed, and the plugin's ``fo_pass`` (an unperturbed pass) runs
under autograd, so ``loss[fo_pass].backward()`` reaches exactly these tensors
(the streamed ZO blocks run without grad: nothing before them requires grad).
The torch optimizer then steps them. The streamed copy is brought up to date at
every flush (the block is marked dirty and written back by the runtime's normal
write-back), so eval, checkpoints and export see the trained weights.

Memory (weights, grads, optimizer state) is counted by :meth:`FirstOrder.memory`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zoedge.adapters import EMBED, HEAD
from zoedge.errors import ConfigError
from zoedge.runtime.resident import Resident
from zoedge.runtime.streamed import StreamedModel
from zoedge.store.manifest import dtype_of

OPTIMIZERS = ("sgd", "adamw", "adamw8bit")


@dataclass
class FOSettings:
    """The torch optimizer of the first-order blocks.

    Attributes:
        optimizer: ``sgd``, ``adamw`` or ``adamw8bit`` (bitsandbytes).
        lr: its learning rate.
        weight_decay: its weight decay.
        momentum: SGD momentum.
    """

    optimizer: str = "sgd"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.0


def read_block(model: StreamedModel, name: str) -> dict[str, torch.Tensor]:
    """The current (host tier) tensors of block ``name`` as fresh CPU tensors.

    Raises:
        ConfigError: a tensor of the block is quantized (first-order blocks need dense weights).
    """
    i = [b.name for b in model.blocks].index(name)
    entry = model.blocks[i]
    model.synchronize()
    host = model._read_block(i)
    out = {}
    for t in entry.tensors:
        if t.quant != "none":
            raise ConfigError(f"first-order block {name}", f"tensor {t.name} is stored quantized ({t.quant})",
                              "train quantized blocks zeroth-order, or prepare with --quant none")
        p = t.parts["data"]
        out[t.name] = host[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).view(t.shape).clone()
    return out


class FirstOrder:
    """Resident first-order blocks and their torch optimizer.

    Args:
        model: the streamed model.
        blocks: names of decoder blocks to train first-order (not the embeddings or head blocks).
        settings: the torch optimizer.
        who: the plugin's name (for errors).
        extra: further plugin-owned tensors to train (see ``ZOOptimizer.fo_parameters``).

    Raises:
        ConfigError: an unknown or non-decoder block, a quantized block, or an unknown optimizer.
    """

    def __init__(self, model: StreamedModel, blocks: Sequence[str], settings: FOSettings, who: str,
                 extra: Mapping[str, torch.Tensor] | None = None) -> None:
        names = [b.name for b in model.blocks]
        for b in blocks:
            if b not in names or b in (EMBED, HEAD):
                raise ConfigError(f"optimizer '{who}' fo_blocks", f"{b!r} is not a decoder block of this model",
                                  f"name blocks among {names[1]} .. {names[-2]}")
        if settings.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer '{who}' fo_optimizer", repr(settings.optimizer),
                              f"use one of {', '.join(OPTIMIZERS)}")
        self.blocks = list(blocks)
        self.settings = settings
        self.device = model.device
        self.params: dict[str, dict[str, torch.Tensor]] = {}
        self.extra = dict(extra or {})
        self.reload(model)
        self.optimizer = self._make_optimizer()

    def _flat(self) -> list[torch.Tensor]:
        return [t for b in self.blocks for t in self.params[b].values()] + list(self.extra.values())

    def _make_optimizer(self) -> torch.optim.Optimizer:
        s, params = self.settings, self._flat()
        if s.optimizer == "sgd":
            return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        if s.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        try:
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(params, lr=s.lr, weight_decay=s.weight_decay)
        except Exception as e:  # noqa: BLE001 - bitsandbytes fails in many ways without a supported GPU
            raise ConfigError("fo_optimizer", f"adamw8bit needs a working bitsandbytes ({type(e).__name__}: {e})",
                              "use fo_optimizer=adamw or sgd") from e

    def reload(self, model: StreamedModel) -> None:
        """(Re)read the blocks' weights from the model's host tier (at start and after a resume)."""
        for b in self.blocks:
            fresh = read_block(model, b)
            if b in self.params:
                with torch.no_grad():
                    for k, v in fresh.items():
                        self.params[b][k].copy_(v)
            else:
                self.params[b] = {k: v.to(self.device).requires_grad_(True) for k, v in fresh.items()}

    def tensors(self, block: Resident, grad: bool) -> Mapping[str, torch.Tensor]:
        """What the block's passes see: the trainable tensors (recorded by autograd only on the grad pass)."""
        return self.params[block.name]

    def write_into(self, block: Resident) -> None:
        """Copy the trained tensors into the streamed copy (a flush) and mark it for write-back."""
        with torch.no_grad():
            for k, v in self.params[block.name].items():
                block.tensors[k].copy_(v)
        block.mark_dirty()

    def step(self, loss: torch.Tensor, reduce_grads: Callable[[Sequence[torch.Tensor]], None] | None = None) -> None:
        """Backward of the grad pass's loss, one optimizer step, grads cleared; ``reduce_grads`` (data-parallel
        runs) sums the gradients over ranks between the backward and the step."""
        loss.backward()
        if reduce_grads is not None:
            reduce_grads(self._flat())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)

    def memory(self) -> dict[str, int]:
        """Bytes of the first-order weights, their grads and the optimizer state (on ``self.device``)."""
        params = self._flat()
        weights = sum(p.numel() * p.element_size() for p in params)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        state = sum(v.numel() * v.element_size() for st in self.optimizer.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
        return {"weights": weights, "grads": grads, "optimizer_state": state, "total": weights + grads + state}

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer's state with string keys (JSON / checkpoint friendly)."""
        sd = self.optimizer.state_dict()
        return {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict({"state": {int(k): dict(v) for k, v in state["state"].items()},
                                        "param_groups": [dict(g) for g in state["param_groups"]]})
