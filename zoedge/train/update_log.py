"""The log of a run's updates: checkpoints that hold the updates instead of the weights.

A ZO fine-tuned model is its base weights plus a short log of updates (the storage remark of *Fine-Tuning
Language Models with Just Forward Passes*): for a replayable plugin (``ZOOptimizer.replayable``, see
:mod:`zoedge.optim.base`) the weights after step t are exactly the base store's after ``apply`` of the updates
of steps 0..t-1, in order, each on the blocks that owed it. The trainer records each step's
:class:`~zoedge.optim.base.Update` here (its data, its step and, when not every block, the blocks that owed
it); a checkpoint of updates (``--checkpoint-weights updates``) stores this log and the identity of the base
store (the sha256 of its ``manifest.json``, which names every block's sha256) instead of the weights: a few
KB instead of a copy of the model.

Resume: the host tier drops its trained copy (:meth:`~zoedge.runtime.streamed.StreamedModel.reset_to_base`:
the disk tier removes its working copy's files, so a block a killed run wrote back after the checkpoint does
not survive), then one stream of the model gives every block each logged update in order through the plugin's
``apply`` (:meth:`~zoedge.optim.base.ZOOptimizer.replay`), the same ops in the same order as the original run,
so the weights are bit-equal to it, and writes it back. Its cost: one read and one write-back of every block
(as one training step) plus updates × blocks block updates (each as costly as a step's lazy update).
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zoedge.errors import ConfigError, StoreError
from zoedge.optim.base import Update, ZOOptimizer
from zoedge.runtime.resident import BlockVisitor, Resident
from zoedge.runtime.streamed import StreamedModel
from zoedge.store.manifest import MANIFEST_NAME


def store_identity(store: Path) -> dict[str, str]:
    """What a log of updates is anchored on: the store's path (for messages) and its manifest's sha256."""
    return {"store": str(store), "manifest_sha256": hashlib.sha256((store / MANIFEST_NAME).read_bytes()).hexdigest()}


def changed_replay_error(checkpoint: Path, changed: Sequence[str]) -> ConfigError:
    """The refusal to replay a log after ``--allow-changes`` of settings that change what an update means."""
    return ConfigError(f"--allow-changes ({', '.join(changed)})", f"{checkpoint} holds a log of updates, replayed by "
                       "the optimizer with its current options and seed: changed ones would rebuild other weights",
                       "resume with the run's settings; change them at a resume from a checkpoint of weights "
                       "(--checkpoint-weights full)")


class UpdateLog:
    """Every update since the base store, in order.

    Args:
        base: :func:`store_identity` of the base store.
        entries: logged updates, as :meth:`state` writes them.
    """

    def __init__(self, base: dict[str, str], entries: Sequence[dict[str, Any]] = ()) -> None:
        self.base = dict(base)
        self.entries: list[dict[str, Any]] = [dict(e) for e in entries]

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, update: Update, owed: frozenset[str] | None) -> None:
        """Log ``update`` (its data and step; not its metrics), owed to ``owed`` (None: every block)."""
        self.entries.append({"step": update.step, "data": update.data,
                             "owed": None if owed is None else sorted(owed)})

    def state(self) -> dict[str, Any]:
        """JSON-able (tensors inside update data are split out by the checkpoint writer)."""
        return {"base": self.base, "log": self.entries}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> UpdateLog:
        return cls(state["base"], state["log"])

    def check_base(self, store: Path, checkpoint: Path) -> None:
        """Refuse to replay onto a store other than the one the updates were made to.

        Raises:
            StoreError: naming the checkpoint, both stores and what to do.
        """
        mine = store_identity(store)
        if mine["manifest_sha256"] != self.base.get("manifest_sha256"):
            raise StoreError(checkpoint, f"holds updates to the store {self.base.get('store')} (manifest sha256 "
                             f"{str(self.base.get('manifest_sha256'))[:12]}...), not to {store} (manifest sha256 "
                             f"{mine['manifest_sha256'][:12]}...): replaying them there would give other weights",
                             "resume with --model set to the store the run started from, or start a fresh run "
                             "in another --output")

    def cost(self, model: StreamedModel) -> int:
        """Block updates a replay performs (updates × the blocks each was owed to)."""
        n = len(model.blocks)
        return sum(n if e["owed"] is None else len(e["owed"]) for e in self.entries)

    def replay(self, model: StreamedModel, optimizer: ZOOptimizer, checkpoint: Path) -> dict[str, Any]:
        """Reset ``model`` to its base store and apply every logged update (see the module docstring).

        Returns:
            {"updates", "blocks", "block_updates", "seconds"}.

        Raises:
            ConfigError: a logged update names a block this model does not stream (another ``--unit``).
        """
        names = {b.name for b in model.blocks}
        unknown = sorted({n for e in self.entries if e["owed"] is not None for n in e["owed"]} - names)
        if unknown:
            raise ConfigError(checkpoint, f"logs updates of blocks {unknown[:3]} that this model does not stream "
                              "(was --unit changed?)", "resume with the --unit of the checkpointed run")
        t0 = time.perf_counter()
        model.reset_to_base()
        model.run(_Replay(optimizer, self.entries))
        model.synchronize()
        return {"updates": len(self.entries), "blocks": len(model.blocks), "block_updates": self.cost(model),
                "seconds": time.perf_counter() - t0}


class _Replay(BlockVisitor):
    """Visits each block once and gives it its logged updates, in order (no forward passes)."""

    def __init__(self, optimizer: ZOOptimizer, entries: Sequence[dict[str, Any]]) -> None:
        self.opt = optimizer
        self.updates = [(Update(dict(e["data"]), {}, int(e["step"])), None if e["owed"] is None else set(e["owed"]))
                        for e in entries]

    def on_resident(self, block: Resident) -> None:
        self.opt.replay(block, [u for u, owed in self.updates if owed is None or block.name in owed])
