"""The Llama family (Llama, Mistral, Qwen2, SmolLM2): ``model.embed_tokens`` → ``model.layers.*`` →
``model.norm`` + ``lm_head``.

These models differ in their masks (sliding windows, per-layer attention
types) but all compute every decoder layer's keyword arguments in the model's
own ``forward``. Rather than copying that logic per family, :meth:`begin` runs
the skeleton's base-model forward once with the decoder layers swapped for
recorders and records what each layer would have received.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from zoedge.adapters.base import EMBED, HEAD, Adapter, Context, layer_index


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its keyword arguments (the KV cache and ``use_cache`` as the model
    passes them) and passes the state through."""

    def __init__(self, sink: list[dict[str, Any]]) -> None:
        super().__init__()
        self.sink = sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:  # positional extras would be lost by a kwargs-only replay; none of our families uses them
            raise TypeError(f"decoder layer received {len(args)} unexpected positional arguments")
        self.sink.append(kwargs)
        return hidden_states


class LlamaFamilyAdapter(Adapter):
    """Adapter for decoder-only models laid out like ``LlamaForCausalLM``."""

    model_types = ("llama", "mistral", "qwen2")

    def __init__(self, config, dtype, device="cpu") -> None:
        super().__init__(config, dtype, device)
        base = self.skeleton.model
        # Non-persistent buffers (rotary inv_freq) were created for real on the CPU (include_buffers=False):
        # move them to the compute device once.
        base.rotary_emb.to(self.device)
        self._sink: list[dict[str, Any]] = []
        self._recorders = nn.ModuleList([_Recorder(self._sink) for _ in range(config.num_hidden_layers)])

    def block_prefixes(self) -> dict[str, str]:
        out = {EMBED: "model.embed_tokens", HEAD: ""}
        out.update({f"layers.{i}": f"model.layers.{i}" for i in range(self.config.num_hidden_layers)})
        return out

    @property
    def embed_weight_name(self) -> str:
        return "model.embed_tokens.weight"

    def block_of(self, tensor: str) -> str | None:
        if tensor.startswith("model.embed_tokens."):
            return EMBED
        if tensor.startswith("model.layers."):
            i = int(tensor.split(".")[2])
            return f"layers.{i}" if i < self.config.num_hidden_layers else None
        if tensor.startswith(("model.norm.", "lm_head.")):
            return HEAD
        return None

    def begin(self, input_ids, attention_mask, position_ids=None, select=None, cache=None) -> Context:
        if position_ids is None:
            position_ids = self.default_positions(input_ids, attention_mask)
        dummy = self.embeds_stand_in(input_ids)
        base = self.skeleton.model
        layers, norm = base.layers, base.norm
        self._sink.clear()
        base.layers, base.norm = self._recorders, nn.Identity()
        try:
            with torch.no_grad():
                base(inputs_embeds=dummy, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=cache is not None, **({self.cache_keyword(base): cache} if cache is not None else {}))
        finally:
            base.layers, base.norm = layers, norm
        return Context(input_ids, attention_mask, position_ids, [dict(k) for k in self._sink], select)

    def run(self, block: str, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, ctx: Context) -> torch.Tensor:
        if block == EMBED:
            return self.call("model.embed_tokens", tensors, (x,))
        i = layer_index(block)
        if i is not None:
            return self.call(f"model.layers.{i}", tensors, (x,), ctx.layer_kwargs[i])
        if block == HEAD:
            h = self.call("model.norm", tensors, (x,))
            h = self.select_rows(h, ctx.select)
            return self.call("lm_head", tensors, (h,))
        raise KeyError(f"unknown block {block!r}")
