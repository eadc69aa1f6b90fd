"""OPT: ``model.decoder.embed_tokens`` + learned positions (+ ``project_in``) → ``model.decoder.layers.*`` →
``final_layer_norm`` (+ ``project_out``) + ``lm_head``."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers.masking_utils import create_causal_mask

from zoedge.adapters.base import EMBED, HEAD, Adapter, Context, layer_index, layer_part

_D = "model.decoder"


class OPTAdapter(Adapter):
    """Adapter for ``OPTForCausalLM`` checkpoints."""

    model_types = ("opt",)
    learned_positions = True

    def block_prefixes(self) -> dict[str, str]:
        out = {EMBED: "", HEAD: ""}
        out.update({f"layers.{i}": f"{_D}.layers.{i}" for i in range(self.config.num_hidden_layers)})
        return out

    @property
    def embed_weight_name(self) -> str:
        return f"{_D}.embed_tokens.weight"

    def block_of(self, tensor: str) -> str | None:
        if tensor.startswith((f"{_D}.embed_tokens.", f"{_D}.embed_positions.", f"{_D}.project_in.")):
            return EMBED
        if tensor.startswith(f"{_D}.layers."):
            i = int(tensor.split(".")[3])
            return f"layers.{i}" if i < self.config.num_hidden_layers else None
        if tensor.startswith((f"{_D}.final_layer_norm.", f"{_D}.project_out.", "lm_head.")):
            return HEAD
        return None

    def is_attention(self, tensor: str) -> bool:
        return ".self_attn" in tensor  # self_attn.* and self_attn_layer_norm.*

    def begin(self, input_ids, attention_mask, position_ids=None, select=None, cache=None) -> Context:
        if position_ids is None:
            position_ids = self.default_positions(input_ids, attention_mask)
        dummy = self.embeds_stand_in(input_ids)
        # Same call as OPTDecoder.forward: the mask depends on the padding (and the cached length) only. The cache is
        # passed positionally: transformers 5 renamed the argument (past_key_values -> cache).
        mask = create_causal_mask(self.config, dummy, attention_mask, cache)
        kwargs = {"attention_mask": mask, "position_ids": position_ids, "use_cache": cache is not None}
        if cache is not None:
            kwargs[self.cache_keyword(self.skeleton.get_submodule(f"{_D}.layers.0"))] = cache
        return Context(input_ids, attention_mask, position_ids, [kwargs] * self.config.num_hidden_layers, select)

    def run(self, block: str, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, ctx: Context) -> torch.Tensor:
        dec = self.skeleton.get_submodule(_D)
        if block == EMBED:
            h = self.call(f"{_D}.embed_tokens", tensors, (x,))
            # OPTLearnedPositionalEmbedding(attention_mask, past_len, position_ids=...) adds its own offset of 2.
            mask = ctx.attention_mask if ctx.attention_mask is not None else torch.ones_like(x)
            pos = self.call(f"{_D}.embed_positions", tensors, (mask, 0), {"position_ids": ctx.position_ids})
            if dec.project_in is not None:
                h = self.call(f"{_D}.project_in", tensors, (h,))
            return h + pos
        i = layer_index(block)
        if i is not None:
            return self.call(f"{_D}.layers.{i}", tensors, (x,), ctx.layer_kwargs[i])
        part = layer_part(block)
        if part is not None:
            return self._half(*part, tensors, x, ctx)
        if block == HEAD:
            if dec.final_layer_norm is not None:
                x = self.call(f"{_D}.final_layer_norm", tensors, (x,))
            if dec.project_out is not None:
                x = self.call(f"{_D}.project_out", tensors, (x,))
            return self.call("lm_head", tensors, (self.select_rows(x, ctx.select),))
        raise KeyError(f"unknown block {block!r}")

    def _half(self, i: int, part: str, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, ctx: Context
              ) -> torch.Tensor:
        """One half of ``OPTDecoderLayer.forward`` (eval mode: dropout is the identity), op for op, so two halves
        give the whole layer's numbers."""
        layer = self.skeleton.get_submodule(f"{_D}.layers.{i}")
        path, kw = f"{_D}.layers.{i}", ctx.layer_kwargs[i]
        if part == "attn":
            residual = x
            if layer.do_layer_norm_before:
                x = self.call(f"{path}.self_attn_layer_norm", tensors, (x,))
            cached = {k: kw[k] for k in ("cache", "past_key_values") if k in kw}
            x, _ = self.call(f"{path}.self_attn", tensors, (),
                             {"hidden_states": x, "position_ids": kw["position_ids"],
                              "attention_mask": kw["attention_mask"], **cached})
            x = residual + x
            if not layer.do_layer_norm_before:
                x = self.call(f"{path}.self_attn_layer_norm", tensors, (x,))
            return x
        if part == "mlp":
            shape = x.shape
            x = x.reshape(-1, x.size(-1))
            residual = x
            if layer.do_layer_norm_before:
                x = self.call(f"{path}.final_layer_norm", tensors, (x,))
            x = self.call(f"{path}.fc2", tensors, (layer.activation_fn(self.call(f"{path}.fc1", tensors, (x,))),))
            x = (residual + x).view(shape)
            if not layer.do_layer_norm_before:
                x = self.call(f"{path}.final_layer_norm", tensors, (x,))
            return x
        raise KeyError(f"unknown unit layers.{i}.{part}")
