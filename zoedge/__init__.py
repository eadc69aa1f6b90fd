"""zoedge: zeroth-order fine-tuning of language models far larger than the GPU, by layer streaming."""
from __future__ import annotations

import importlib
from typing import Any

from zoedge.errors import (CheckpointError, ConfigError, DataError, PluginError, StoreError, TrainingError,
                           ZoedgeError)

__version__ = "0.1.0"

# Heavy names (torch, transformers) load on first use, so `zoedge --help` stays fast.
_LAZY = {"BlockVisitor": "zoedge.runtime.resident", "Resident": "zoedge.runtime.resident",
         "StreamedModel": "zoedge.runtime.streamed", "load": "zoedge.loading", "Model": "zoedge.loading",
         "prepare": "zoedge.store.prepare", "ZOOptimizer": "zoedge.optim.base",
         "register_optimizer": "zoedge.optim.registry", "build_optimizer": "zoedge.optim.registry",
         "LowRankPerturbed": "zoedge.optim.lowrank", "NoiseSource": "zoedge.noise.source",
         "Trainer": "zoedge.train.trainer", "TrainSettings": "zoedge.train.trainer",
         "Example": "zoedge.train.tasks", "default_model_dir": "zoedge.models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        attr = "build" if name == "build_optimizer" else name
        value = getattr(importlib.import_module(_LAZY[name]), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zoedge' has no attribute {name!r}")


__all__ = ["CheckpointError", "ConfigError", "DataError", "PluginError", "StoreError", "TrainingError", "ZoedgeError",
           *_LAZY]
