"""zoedge: zeroth-order fine-tuning of language models far larger than the GPU, by layer streaming."""
from zoedge.errors import (CheckpointError, ConfigError, DataError, PluginError, StoreError, TrainingError,
                           ZoedgeError)
from zoedge.runtime.streamed import BlockVisitor, Resident, StreamedModel, load
from zoedge.store.prepare import prepare

__version__ = "0.1.0"

__all__ = ["BlockVisitor", "CheckpointError", "ConfigError", "DataError", "PluginError", "Resident", "StoreError",
           "StreamedModel", "TrainingError", "ZoedgeError", "load", "prepare"]
