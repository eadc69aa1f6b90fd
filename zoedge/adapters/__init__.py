"""Model-family adapters. Adding a family = one small file with an :class:`Adapter` subclass,
listed in ``ADAPTERS`` below."""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from zoedge.adapters.base import EMBED, HEAD, UNITS, Adapter, Context, layer_index, layer_part
from zoedge.adapters.llama import LlamaFamilyAdapter
from zoedge.adapters.opt import OPTAdapter
from zoedge.errors import ConfigError

ADAPTERS: tuple[type[Adapter], ...] = (LlamaFamilyAdapter, OPTAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config: PretrainedConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                where: str = "config.json") -> Adapter:
    """Build the adapter for ``config.model_type``.

    Raises:
        ConfigError: the architecture is not supported (names it and the supported ones).
    """
    for cls in ADAPTERS:
        if config.model_type in cls.model_types:
            return cls(config, dtype, device)
    raise ConfigError(where, f"unsupported architecture model_type={config.model_type!r} "
                             f"(architectures={getattr(config, 'architectures', None)})",
                      f"use one of {supported_model_types()}, or add an adapter (see zoedge/adapters/base.py)")


__all__ = ["ADAPTERS", "EMBED", "HEAD", "UNITS", "Adapter", "Context", "adapter_for", "layer_index", "layer_part",
           "supported_model_types"]
