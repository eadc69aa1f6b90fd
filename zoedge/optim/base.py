"""The optimizer plugin API: the framework owns the loop and the lazy update, a plugin writes the estimate and
the apply.

A plugin is a subclass of :class:`ZOOptimizer`, registered under a name (see
:mod:`zoedge.optim.registry`). Its keyword ``__init__`` parameters are its
options (``--opt KEY=VALUE`` on the command line, coerced by annotation); the
trainer passes ``seed`` itself. A plugin implements three hooks, plus two
optional ones:

* ``perturb(block, p)`` — the weights pass ``p`` sees (e.g. θ + εz through
  ``block.perturbed``, which the runtime forms where it keeps the noise, see
  :class:`~zoedge.runtime.resident.Resident`; or a
  :class:`~zoedge.optim.lowrank.LowRankPerturbed` view); never modifies
  ``block.tensors``; a pass that reads noise not drawn in this residency is refused;
* ``end_step(losses)`` — one fp32 loss per pass → the step's :class:`Update`
  (a value: the scalars ``apply`` needs, plus metrics for the log);
* ``apply(block, update)`` — apply ``update`` in place on ``block.tensors`` (e.g. part by part,
  ``block.parts()``, with the update step's noise from ``block.noise``);
* optional ``draw(block)`` — this step's randomness for a resident block (once
  per residency, before its passes: ``block.noise(key, fill_of)``, read by the +ε and −ε passes);
* optional ``begin_step(t)`` — per-step schedule values;
* optional ``on_flush(block)`` — methods that keep their update off the base (factors) merge it here.

Hook sequence of training step ``t`` (the runtime streams each block once):

1. ``begin_step(t)``;
2. for each block, while it is resident on the device: the framework applies
   the pending update of step t−1 (``apply``, exactly once per block, then
   marks the block dirty for dense methods), then ``draw(block)``, then
   ``perturb(block, p)`` for each of the ``passes`` forward passes;
3. ``end_step(losses)`` returns the :class:`Update`; the framework keeps it
   pending, owed to every block that was resident during the step.

Before eval, checkpoint and export the trainer *flushes*: it streams the blocks
once with no inputs, so the framework applies the pending update to every block
that still owes it. The framework raises :class:`~zoedge.errors.PluginError`
if a block would get an update twice (:meth:`ZOOptimizer.apply_pending`) or a
new step would drop an update some block never got. The pending update and
which blocks got it are part of :meth:`ZOOptimizer.state_dict` (checkpoints).

Other shapes of method use the same hooks:

* three passes per step (HiZOO): ``passes = 3``, pass 0 unperturbed;
* periodic extra streamed phases (DiZO's projection learning):
  ``extra_phases(t)`` yields visitors the trainer streams (after a flush) on
  step t's batch before the step, each followed by ``finish_phase``;
* first-order blocks (LoHO, HZO): ``fo_blocks`` names blocks that stay resident
  with ``requires_grad`` and are trained by a torch optimizer on the
  unperturbed pass ``fo_pass`` (see :mod:`zoedge.optim.first_order`);
* several independent directions per step (MeZO with q > 1): ``direction_passes()``
  lists each direction's passes, so that data-parallel ranks can split the
  directions instead of the batch (``--dp-mode directions``, see
  :mod:`zoedge.train.world`): each rank streams :meth:`ZOOptimizer.only_directions`'s
  view (its directions' passes only; ``draw`` may skip the noise of the
  directions :meth:`ZOOptimizer.evaluates` says are elsewhere), the ranks
  gather the passes' losses, and every rank's ``end_step`` and ``apply`` see
  all of them, exactly as in one process.

State is keyed by tensor name (streamed tensors are not resident objects):
``plugin_state()`` / ``load_plugin_state()`` hold tensors and JSON scalars.
The class is a ``torch.optim.Optimizer`` over one empty placeholder so that
``param_groups`` (``lr``) and torch's LR schedulers work unchanged.

Replay (checkpoints without weights; the storage remark of *Fine-Tuning Language
Models with Just Forward Passes*): a plugin whose streamed weights after step t
are exactly the base weights after ``apply`` of updates 1..t, in order, block by
block (nothing else ever writes ``block.tensors``; ``apply`` reads only the
``Update`` and options fixed at construction) sets ``replayable = True`` in its class body: the claim is never
inherited (a subclass that does not restate it is not replayable). The
trainer then may checkpoint the log of updates instead of the weights, and
:meth:`ZOOptimizer.replay` rebuilds the weights from the base store on resume
(see :mod:`zoedge.train.update_log`). The default is False: a subclass that
changes weights elsewhere (extra phases, factor merges, first-order blocks) or
whose ``apply`` reads evolving plugin state must not claim it.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from zoedge.errors import PluginError
from zoedge.optim.first_order import FOSettings
from zoedge.noise.source import LEGACY_GENERATOR, NoiseSource
from zoedge.optim.state import OptimizerState, StateSpec
from zoedge.runtime.resident import BlockVisitor, Resident
from zoedge.store.manifest import BlockEntry


@dataclass
class Update:
    """One step's update, as a value.

    Attributes:
        data: what ``apply`` needs (numbers, lists, tensors), e.g. ``{"g": [...], "lr": 1e-5}``.
        metrics: scalars for the log and the progress bar (e.g. ``{"projected_grad": g}``).
        step: the step that produced it (set by the framework; regenerate that step's noise from it).
    """

    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    step: int = -1

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


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
    REQUIRED_HOOKS: ClassVar[tuple[str, ...]] = ("perturb", "end_step", "apply")
    #: the framework's own methods: a plugin overriding one is refused by the registry
    FRAMEWORK_METHODS: ClassVar[tuple[str, ...]] = ("on_resident", "pass_tensors", "finish_step", "flushed",
                                                    "apply_pending", "state_dict", "load_state_dict",
                                                    "only_directions", "evaluates", "replay", "state_of", "state_bytes")
    #: forward passes per step, all run while each block is resident
    passes: int = 2
    #: the unperturbed pass that first-order blocks train on (``None``: the plugin has no FO blocks)
    fo_pass: int | None = None
    #: dense methods change ``block.tensors`` in ``apply`` (the framework marks the block dirty); methods
    #: that keep their update elsewhere (factors) set False and call ``block.mark_dirty()`` themselves if needed
    dense: ClassVar[bool] = True
    #: the streamed weights are a pure function of the base and the applied updates (see the module docstring):
    #: checkpoints may hold the update log instead of the weights
    replayable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """``replayable`` is a claim about a class's own update, never inherited: a subclass that does not restate
        it in its body is not replayable (a changed ``apply`` cannot resume from an update log silently)."""
        super().__init_subclass__(**kwargs)
        if "replayable" not in cls.__dict__:
            cls.replayable = False

    def __init__(self, *, seed: int = 0, lr: float = 1e-6, **defaults: Any) -> None:
        self._placeholder = torch.zeros(0)
        torch.optim.Optimizer.__init__(self, [self._placeholder], dict(lr=lr, **defaults))
        self.seed = seed
        self.noise = NoiseSource(seed)
        self.t = 0               # the step in progress (begin_step)
        self.steps_done = 0      # completed steps
        self._pending: Update | None = None
        self._owed: set[str] = set()       # blocks the pending update is owed to
        self._applied: set[str] = set()    # ... of which these have it
        self._visited: set[str] = set()    # blocks resident during the step in progress
        self._in_step = False
        self.first_order: Any = None       # zoedge.optim.first_order.FirstOrder, attached by the trainer
        self._directions: frozenset[int] | None = None  # directions this process evaluates (None: all)
        #: the per-weight state the plugin declares (:meth:`state_spec`), owned by the framework
        self.block_state = OptimizerState()
        self._lent: list[tuple[torch.Tensor, torch.Tensor]] = []  # (host state, its device copy) to write back

    # ------------------------------------------------------------ plugin hooks
    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    def begin_step(self, step: int) -> None:
        """Step ``step`` starts (0-based). Overrides must call ``super().begin_step(step)``."""
        self.t = step
        self._in_step = True
        self._visited = set()

    def draw(self, block: Resident) -> None:
        """This step's randomness for ``block`` (once per residency, before its passes). Default none."""

    @abstractmethod
    def perturb(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        """The weights pass ``p`` sees; never modify ``block.tensors`` here."""

    @abstractmethod
    def end_step(self, losses: Sequence[torch.Tensor]) -> Update:
        """Turn the passes' losses (one fp32 scalar per pass) into the step's update."""

    @abstractmethod
    def apply(self, block: Resident, update: Update) -> None:
        """Apply ``update`` (of step ``update.step``) to ``block`` in place. Called once per block by the framework."""

    def on_flush(self, block: Resident) -> None:
        """A flush visits ``block`` (after its pending update): make ``block.tensors`` hold the model's current
        weights for eval / checkpoint / export, e.g. merge factors kept off the base (call ``block.mark_dirty()``).
        Default nothing."""

    def extra_phases(self, step: int) -> Iterator[BlockVisitor]:
        """Extra streamed phases before ``step`` (DiZO projection learning), run on step ``step``'s batch after a
        flush; each yielded visitor is streamed (with no inputs if its ``passes`` is 0) and its losses given to
        :meth:`finish_phase` before the next is pulled. Default none."""
        return iter(())

    def finish_phase(self, phase: BlockVisitor, losses: Sequence[torch.Tensor]) -> None:
        """Losses of an extra phase's passes."""

    def fo_blocks(self, blocks: Sequence[BlockEntry]) -> list[str]:
        """Names of blocks to train first-order, kept resident (LoHO / HZO), chosen from the model's blocks (in
        order, with their tensors' names, shapes and bytes). Default none. A plugin naming blocks (or returning
        :meth:`fo_parameters`) sets ``fo_pass`` (an unperturbed pass) and may override :meth:`fo_settings`."""
        return []

    def fo_parameters(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Further tensors the plugin trains first-order (``requires_grad`` leaves on ``device``, e.g. sparse deltas
        it adds to streamed weights on the ``fo_pass``); stepped by the same torch optimizer. Default none."""
        return {}

    def fo_settings(self) -> FOSettings:
        """The torch optimizer of the first-order blocks (default: SGD, lr 1e-4)."""
        return FOSettings()

    def direction_passes(self) -> list[list[int]] | None:
        """The passes of each of a step's independent directions, for direction-split data parallelism.

        Entry k lists the passes that evaluate direction k: their losses depend on direction k's noise only (and
        on passes in no entry, e.g. an unperturbed pass, which every rank runs). ``end_step`` and ``apply`` must
        use every direction's losses and regenerate every direction's noise, as they do in one process. Default
        ``None``: the passes cannot be split (``--dp-mode directions`` refuses the plugin)."""
        return None

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """After a flush: when every change the plugin made to the weights is ΔW = B A of 2-D tensors whose factors
        it kept, those factors by tensor name (B [m, k], A [k, n], fp32, CPU): ``finetune`` writes them as a PEFT
        LoRA adapter exactly, with no factorisation. Default ``{}``: not kept (or other tensors changed too)."""
        return {}

    def state_spec(self, name: str, shape: tuple[int, ...]) -> Mapping[str, StateSpec]:
        """The state this plugin keeps for weight ``name`` of ``shape`` (state name -> dtype and shape; shape None:
        the weight's), e.g. ``{"m": StateSpec(torch.float32)}`` for momentum. The framework owns it: zero at first
        use, on the host tier, on the block's device in :meth:`state_of`, checkpointed and resumed, counted by
        ``plan``. Default none."""
        return {}

    def state_of(self, block: Resident, key: str) -> dict[str, torch.Tensor]:
        """State ``key`` of ``block``'s tensors that declare it (:meth:`state_spec`), by tensor name, on the
        block's device. Change it in place in ``apply`` (or ``on_flush``): the framework keeps the change."""
        out = {}
        for name, weight in block.tensors.items():
            spec = self.state_spec(name, tuple(weight.shape)).get(key)
            if spec is None:
                continue
            host = self.block_state.get(key, name, spec, weight)
            if host.device != weight.device:
                dev = host.to(weight.device)
                self._lent.append((host, dev))
                host = dev
            out[name] = host
        return out

    def state_bytes(self, tensors: Iterable[tuple[str, tuple[int, ...]]]) -> int:
        """Bytes of the declared state of weights ``(name, shape)`` (what ``plan`` counts)."""
        return sum(spec.nbytes(shape) for name, shape in tensors for spec in self.state_spec(name, shape).values())

    def _return_state(self) -> None:
        """Write the device copies :meth:`state_of` lent back to the host tier."""
        for host, dev in self._lent:
            host.copy_(dev)
        self._lent = []

    def plugin_state(self) -> dict[str, Any]:
        """Plugin state to checkpoint: tensors (keyed by name) and JSON-able values."""
        return {}

    def load_plugin_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`plugin_state`."""

    # --------------------------------------------------------------- framework
    def on_resident(self, block: Resident) -> None:
        """Runtime hook: apply the pending update if ``block`` owes it, then draw (during a step)."""
        if self.first_order is not None and block.name in self.first_order.blocks:
            if not self._in_step:  # a flush: bring the streamed copy up to date for eval / save / export
                self.first_order.write_into(block)
            return  # trained first-order, never perturbed
        if self._pending is not None and block.name in self._owed and block.name not in self._applied:
            self.apply_pending(block)
            block.forget_noise()  # the update's noise is its step's: a pass must read this step's draw
        if self._in_step:
            self._visited.add(block.name)
            self.draw(block)
        else:
            self.on_flush(block)
        self._return_state()

    def apply_pending(self, block: Resident) -> None:
        """Apply the pending update to ``block``, exactly once.

        Raises:
            PluginError: there is no pending update, ``block`` already got it, or was not resident in its step.
        """
        who = f"optimizer '{self.name or type(self).__name__}', block {block.name}"
        if self._pending is None:
            raise PluginError(who, "has no pending update to apply", "apply updates only through the trainer")
        if block.name in self._applied:
            raise PluginError(who, f"would get the update of step {self._pending.step} a second time",
                              "let the framework apply updates (it applies each once, at the next residency)")
        if block.name not in self._owed:
            raise PluginError(who, f"was not resident in step {self._pending.step}, so it owes no update",
                              "apply updates only through the trainer")
        self.apply(block, self._pending)
        self._return_state()
        self._applied.add(block.name)
        if self.dense:
            block.mark_dirty()

    def pass_tensors(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        """Runtime hook: first-order blocks see their trainable tensors, the others ``perturb(block, p)``."""
        if self.first_order is not None and block.name in self.first_order.blocks:
            return self.first_order.tensors(block, p == self.fo_pass)
        return self.perturb(block, p)

    def evaluates(self, k: int) -> bool:
        """Whether this process evaluates direction ``k`` (False only for directions other ranks evaluate in the
        direction-split mode): ``draw`` may skip the noise of the others."""
        return self._directions is None or k in self._directions

    def only_directions(self, directions: Sequence[int]) -> tuple[BlockVisitor, list[int]]:
        """Evaluate only ``directions`` of every step (direction-split data parallelism, :mod:`zoedge.train.world`).

        Returns:
            (the visitor to stream for a step's passes, the plugin's pass behind each of its passes): passes of
            ``directions`` and passes of no direction, in the plugin's order. The losses of all the plugin's
            passes, gathered from every rank, go to :meth:`finish_step`.

        Raises:
            PluginError: the plugin declares no :meth:`direction_passes` (or an invalid one), or ``directions``
                are not among them.
        """
        who = f"optimizer '{self.name or type(self).__name__}'"
        groups = self.direction_passes()
        if groups is None:
            raise PluginError(who, "cannot split its passes by direction (it declares no direction_passes())",
                              "use --dp-mode batch with this optimizer, or implement direction_passes() in it")
        flat = [p for g in groups for p in g]
        if len(set(flat)) != len(flat) or not all(0 <= p < self.passes for p in flat):
            raise PluginError(who, f"direction_passes() {groups} must name distinct passes in 0..{self.passes - 1}",
                              "fix the plugin's direction_passes()")
        bad = [k for k in directions if not 0 <= k < len(groups)]
        if bad:
            raise PluginError(who, f"has {len(groups)} direction(s); asked for {bad}", "split 0..q-1 only")
        mine = {p for k in directions for p in groups[k]} | (set(range(self.passes)) - set(flat))
        self._directions = frozenset(directions)
        order = sorted(mine)
        return _SomePasses(self, order), order

    @property
    def grad_pass(self) -> int | None:  # read by the runtime: the pass that runs under autograd
        return self.fo_pass if self.first_order is not None else None

    @property
    def pending(self) -> Update | None:
        """The update not yet applied to every block that owes it (read-only)."""
        return self._pending

    @property
    def owed(self) -> frozenset[str]:
        """The blocks the pending update is owed to (those resident during its step; read-only)."""
        return frozenset(self._owed) if self._pending is not None else frozenset()

    def replay(self, block: Resident, updates: Sequence[Update]) -> None:
        """Apply logged ``updates`` to ``block`` in their order, through ``apply`` (resume from a checkpoint of
        updates: ``block`` holds the base weights). Only with no pending update, and only for replayable plugins.

        Raises:
            PluginError: the plugin is not replayable, or an update is pending.
        """
        who = f"optimizer '{self.name or type(self).__name__}'"
        if not self.replayable:
            raise PluginError(who, "is not replayable (its weights are not a pure function of the base and its "
                              "updates)", "checkpoint its weights (--checkpoint-weights full)")
        if self._pending is not None:
            raise PluginError(who, f"has the update of step {self._pending.step} pending during a replay",
                              "replay before the first step of the resumed run")
        for update in updates:
            self.apply(block, update)
        self._return_state()
        if updates and self.dense:
            block.mark_dirty()

    def finish_step(self, losses: Sequence[torch.Tensor]) -> dict[str, float]:
        """Called by the trainer after the step's passes: ``end_step``, then the update becomes pending.

        Raises:
            RuntimeError: wrong number of losses.
            PluginError: the previous update was not applied to every block that owes it.
        """
        if len(losses) != self.passes:
            raise RuntimeError(f"{self.name or type(self).__name__}: expected {self.passes} losses, got {len(losses)}")
        self._check_settled(f"step {self.t} ends")
        update = self.end_step(losses)
        if not isinstance(update, Update):
            raise PluginError(f"optimizer '{self.name or type(self).__name__}'",
                              f"end_step returned {type(update).__name__}, not an Update",
                              "return zoedge.optim.base.Update(data, metrics)")
        update.step = self.t
        self._pending, self._owed, self._applied = update, set(self._visited), set()
        self._visited, self._in_step = set(), False
        self.step()
        self.steps_done += 1
        return dict(update.metrics)

    def flushed(self) -> None:
        """Called by the trainer after a flush stream: every block that owed the pending update has it."""
        self._check_settled("flush")
        self._pending, self._owed, self._applied = None, set(), set()
        self._in_step = False

    def _check_settled(self, when: str) -> None:
        missing = self._owed - self._applied if self._pending is not None else set()
        if missing:
            raise PluginError(f"optimizer '{self.name or type(self).__name__}'",
                              f"at {when}, the update of step {self._pending.step} was never applied to "  # type: ignore[union-attr]
                              f"{sorted(missing)}", "stream every block once per step (or flush) before the next")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Marks the step done for torch's LR schedulers; ZO updates happen in ``apply``."""
        return None

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        pend = self._pending
        pending = None if pend is None else {"data": pend.data, "metrics": pend.metrics, "step": pend.step,
                                             "owed": sorted(self._owed), "applied": sorted(self._applied)}
        return {"param_groups": groups, "seed": self.seed, "noise_generator": self.noise.generator,
                "steps_done": self.steps_done, "pending": pending, "plugin": self.plugin_state(),
                "block_state": self.block_state.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # type: ignore[override]
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        self.seed = int(state["seed"])
        # the same noise variant, drawn as the checkpointed run drew it (so a resumed run's noise is its own)
        self.noise = self.noise.reseeded(self.seed, state.get("noise_generator", LEGACY_GENERATOR))
        self.steps_done = int(state["steps_done"])
        pend = state.get("pending")
        if pend is None:
            self._pending, self._owed, self._applied = None, set(), set()
        else:
            self._pending = Update(dict(pend["data"]), dict(pend["metrics"]), int(pend["step"]))
            self._owed, self._applied = set(pend["owed"]), set(pend["applied"])
        self.load_plugin_state(state.get("plugin", {}))
        self.block_state.load_state_dict(state.get("block_state", {}))


class _SomePasses(BlockVisitor):
    """A view of an optimizer that runs only some of its passes (renumbered 0..n-1): one rank's directions."""

    grad_pass = None  # first-order blocks are refused in the direction-split mode

    def __init__(self, opt: ZOOptimizer, passes: Sequence[int]) -> None:
        self.opt, self.order = opt, list(passes)
        self.passes = len(self.order)
        self.concurrent = opt.concurrent

    def on_resident(self, block: Resident) -> None:
        self.opt.on_resident(block)

    def pass_tensors(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        return self.opt.pass_tensors(block, self.order[p])

    def on_passes_done(self, block: Resident) -> None:
        self.opt.on_passes_done(block)
