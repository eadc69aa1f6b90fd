"""The optimizer plugin API: the contract every ZO method is built on.

A plugin is a subclass of :class:`ZOOptimizer`, registered under a name (see
:mod:`zoedge.optim.registry`). Its keyword ``__init__`` parameters are its
options (``--opt KEY=VALUE`` on the command line, coerced by annotation); the
trainer passes ``seed`` itself.

Hook sequence of one training step ``t`` (the runtime streams each block once):

1. ``begin_step(t)`` — choose the step's randomness and schedule values.
2. For each block, in order, while it is resident on the device:

   a. ``on_resident(block)`` — apply the *pending* update from step t-1 (lazy:
      with t-1's scalars and lr) in place on ``block.tensors`` and call
      ``block.mark_dirty()``; draw this step's noise into ``block.workspace(..)``
      buffers (allocated once, reused by every block);
   b. for each pass ``p < passes``: ``pass_tensors(block, p)`` returns the weights
      pass p sees (e.g. θ + εz in scratch, or a :class:`~zoedge.optim.lowrank.LowRankPerturbed`
      view); the base copy must not be modified; the runtime runs the block on
      pass p's own hidden-state stream;
   c. ``on_passes_done(block)``.
3. ``end_step(losses)`` — one fp32 loss per pass; compute the projected
   gradient(s) and store the pending update; return metrics for the log.

Before eval, checkpoint and export the trainer *flushes*: it streams the
blocks once with no inputs, so only ``on_resident`` runs, then calls
``flushed()``. Plugins must therefore apply a pending update exactly once per
block (track which blocks have it).

Other shapes of method fit the same hooks:

* three passes per step (HiZOO): ``passes = 3``, pass 0 unperturbed;
* periodic extra phases reading the base weights (DiZO): ``extra_phases(t)``
  returns visitors the trainer streams before step t, each finished by
  ``finish_phase``; base weights are the prepared store, readable at any time;
* first-order blocks kept resident with their own torch optimizer (LoHO,
  HZO): ``fo_blocks`` names them. *The trainer does not run FO blocks yet*;
  a plugin that names any is refused with a clear error.

State is keyed by tensor name (streamed tensors are not resident objects):
``plugin_state()`` / ``load_plugin_state()`` hold tensors and JSON scalars.
The class is a ``torch.optim.Optimizer`` over one empty placeholder so that
``param_groups`` (``lr``) and torch's LR schedulers work unchanged.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from zoedge.optim.noise import NoiseSource
from zoedge.runtime.streamed import BlockVisitor, Resident


class ZOOptimizer(torch.optim.Optimizer, BlockVisitor, metaclass=ABCMeta):
    """Base class of zeroth-order optimizer plugins.

    Args:
        seed: the run's seed (given by the trainer; all noise derives from it).
        lr: learning rate (``param_groups[0]["lr"]``, driven by LR schedulers).
        **defaults: further per-group hyper-parameters stored in ``param_groups[0]``.
    """

    #: registry name and one-line description (set by subclasses or the register decorator)
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: hooks a plugin must override
    REQUIRED_HOOKS: ClassVar[tuple[str, ...]] = ("on_resident", "pass_tensors", "end_step")
    #: forward passes per step, all run while each block is resident
    passes: int = 2
    #: dense methods write updated blocks back; low-rank methods that keep factors need not
    dense: ClassVar[bool] = True

    def __init__(self, *, seed: int = 0, lr: float = 1e-6, **defaults: Any) -> None:
        self._placeholder = torch.zeros(0)
        torch.optim.Optimizer.__init__(self, [self._placeholder], dict(lr=lr, **defaults))
        self.seed = seed
        self.noise = NoiseSource(seed)
        self.t = 0               # the step in progress (begin_step)
        self.steps_done = 0      # completed steps

    # ---------------------------------------------------------------- hooks
    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    def begin_step(self, step: int) -> None:
        """Step ``step`` starts (0-based). Default: remember it."""
        self.t = step

    @abstractmethod
    def on_resident(self, block: Resident) -> None:
        """Apply the pending update to ``block`` (once) and draw this step's noise."""

    @abstractmethod
    def pass_tensors(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        """The weights pass ``p`` sees; never modify ``block.tensors`` here."""

    @abstractmethod
    def end_step(self, losses: Sequence[torch.Tensor]) -> dict[str, float]:
        """Turn the passes' losses into the pending update; return metrics (e.g. ``{"g": ...}``)."""

    def flushed(self) -> None:
        """Every block has been visited since the last ``end_step``: pending updates are applied."""

    def extra_phases(self, step: int) -> list[BlockVisitor]:
        """Extra streamed passes to run before ``step`` (DiZO projection learning). Default none."""
        return []

    def finish_phase(self, phase: BlockVisitor, losses: Sequence[torch.Tensor]) -> None:
        """Losses of an extra phase's passes."""

    def fo_blocks(self, block_names: Sequence[str]) -> list[str]:
        """Blocks to train first-order, kept resident (LoHO / HZO). Default none."""
        return []

    # ------------------------------------------------------------ framework
    def finish_step(self, losses: Sequence[torch.Tensor]) -> dict[str, float]:
        """Called by the trainer after the step's passes: ``end_step`` + bookkeeping."""
        if len(losses) != self.passes:
            raise RuntimeError(f"{self.name or type(self).__name__}: expected {self.passes} losses, got {len(losses)}")
        metrics = self.end_step(losses)
        self.step()
        self.steps_done += 1
        return metrics

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Marks the step done for torch's LR schedulers; ZO updates happen in the hooks."""
        return None

    def plugin_state(self) -> dict[str, Any]:
        """Plugin state to checkpoint: tensors (keyed by name) and JSON-able values."""
        return {}

    def load_plugin_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`plugin_state`."""

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"param_groups": groups, "seed": self.seed, "steps_done": self.steps_done,
                "plugin": self.plugin_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # type: ignore[override]
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        self.seed = int(state["seed"])
        self.noise = NoiseSource(self.seed)
        self.steps_done = int(state["steps_done"])
        self.load_plugin_state(state.get("plugin", {}))


def apply_once(applied: set[str], block: Resident) -> bool:
    """True the first time ``block`` is seen since ``applied`` was reset (for lazy updates)."""
    if block.name in applied:
        return False
    applied.add(block.name)
    return True
