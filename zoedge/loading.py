"""``zoedge.load``: open a model for streaming (a prepared store, a Hugging Face folder, a finetune run or the default
model) as a :class:`Model`, the streamed model with a ``generate`` convenience."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zoedge.generation import generate
from zoedge.runtime.streamed import StreamedModel
from zoedge.store.cache import SOURCE_GLOBS
from zoedge.store.manifest import MANIFEST_NAME
from zoedge.runtime.lora import attach_peft_dir
from zoedge.train.job import model_and_adapter, resolve_dtype, resolve_store


class Model(StreamedModel):
    """A :class:`StreamedModel` that can complete prompts (what ``zoedge.load`` returns)."""

    def generate(self, prompts: Any, **knobs: Any) -> str | list[str]:
        """Complete ``prompts`` (a text, or a list of texts / ``{"messages": [...]}`` chats) with the store's tokenizer,
        each new token one streamed pass with a per-layer KV cache. ``knobs``: ``max_new_tokens``, ``temperature``
        (0, the default: greedy), ``top_p``, ``top_k``, ``stop``, ``seed``, ``batch_size``, ``chat`` (see
        :func:`zoedge.generation.generate`, which also returns token counts and timings). Returns the completion
        text, or a list of them for a list."""
        texts = [c.completion for c in generate(self, prompts, **knobs).completions]
        return texts if isinstance(prompts, (list, tuple)) else texts[0]


def load(model: str | Path | None = None, device: str | torch.device = "cpu", tier: str = "ram", prefetch: int = 1,
         dtype: str | None = None, adapter: str | Path | None = None, **kwargs: Any) -> Model:
    """Open a model as a :class:`Model` (the :class:`StreamedModel`'s Args are the others): ``model`` is a prepared
    block store, a Hugging Face checkpoint directory (prepared once, in ``dtype``, default fp32, into zoedge's cache), a
    finetune run's output directory (its ``model/``; a ``--peft lora`` run without ``--merge``: its base with its
    adapter), or None for the default SmolLM2-135M-Instruct. ``adapter``: a PEFT LoRA directory applied on top.

    Raises:
        StoreError: ``model`` is neither of those (no manifest.json, no checkpoint weights), or a damaged store.
        ConfigError: ``dtype`` other than a store's own, or an adapter that is unreadable or does not fit the model.
    """
    source, adapter_dir = model_and_adapter(None if model is None else str(model),
                                            None if adapter is None else str(adapter))[:2]
    path = None if source is None else Path(source)
    if path is None or (not (path / MANIFEST_NAME).is_file() and any(any(path.glob(g)) for g in SOURCE_GLOBS)):
        path = resolve_store(source, resolve_dtype(source, dtype), progress=False)  # a checkpoint: prepared once
    elif dtype is not None:
        resolve_dtype(source, dtype)  # refuses a dtype the store does not hold
    opened = Model(path, device=device, tier=tier, prefetch=prefetch, **kwargs)  # else a store (or its error)
    if adapter_dir is not None:
        attach_peft_dir(opened, adapter_dir)
    return opened
