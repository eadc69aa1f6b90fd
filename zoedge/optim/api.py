"""Everything an optimizer plugin may use, in one module: a plugin imports ``zoedge.optim.api`` and nothing else
from zoedge (the plugin guide: docs/plugins.md; the contract: :class:`ZOOptimizer`).

A block, while resident (:class:`Resident`), offers what a method needs and hides how the runtime stores it:
``block.tensors`` (its weights), ``block.noise(key, fill_of)`` (a step's noise, :class:`BlockNoise`),
``block.perturbed(name, key, alpha)`` (what a pass sees of θ + αz), ``block.parts()`` (where an update is
applied, in place: :class:`UpdatePart`), ``block.workspace(key)`` (scratch shaped like the block) and
``block.stored(name, out)`` (the prepared weights). Per-weight optimizer state (momentum) is declared by
:meth:`ZOOptimizer.state_spec` and read with ``self.state_of(block, key)``: the framework keeps and checkpoints it.
"""
from __future__ import annotations

from zoedge.adapters.base import layer_index
from zoedge.errors import ConfigError, PluginError
from zoedge.optim.base import Update, ZOOptimizer
from zoedge.optim.first_order import FOSettings
from zoedge.optim.lowrank import LowRankPerturbed
from zoedge.noise.source import NOISE_KINDS, NoiseSource, make_noise, stream_seed
from zoedge.optim.registry import register_optimizer
from zoedge.optim.sparse_delta import SparseDeltaWeight, sample_entries
from zoedge.optim.state import StateSpec
from zoedge.runtime.perturbed import Fill
from zoedge.runtime.resident import BlockNoise, BlockVisitor, Resident, UpdatePart
from zoedge.store.manifest import BlockEntry, dtype_of

__all__ = ["BlockEntry", "BlockNoise", "BlockVisitor", "ConfigError", "dtype_of", "Fill", "FOSettings", "layer_index",
           "LowRankPerturbed", "make_noise", "NOISE_KINDS", "NoiseSource", "PluginError", "register_optimizer",
           "Resident", "sample_entries", "SparseDeltaWeight", "StateSpec", "stream_seed", "Update", "UpdatePart",
           "ZOOptimizer"]
