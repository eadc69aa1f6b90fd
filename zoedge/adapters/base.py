"""What a model family must tell the runtime: its blocks and how to call them.

An adapter builds the Hugging Face model skeleton on the meta device (no
weights, no memory) and runs each streaming unit with
``torch.func.functional_call``, binding the weights of whatever copy the caller
hands in (a device slot's views, or a plugin's perturbed tensors). The model's
own modules do the maths; the adapter only knows names and call signatures.

Streaming units are called *blocks* and named ``"embed"``, ``"layers.<i>"`` and
``"head"``, always run in that order. Tensor names are the full names of the
``*ForCausalLM`` state dict (e.g. ``model.layers.3.mlp.up_proj.weight``).
"""
from __future__ import annotations

import copy
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from torch.func import functional_call
from transformers import AutoModelForCausalLM, PretrainedConfig

from zoedge.errors import ConfigError

EMBED, HEAD = "embed", "head"
_LAYER = re.compile(r"^layers\.(\d+)$")
_PART = re.compile(r"^layers\.(\d+)\.(\w+)$")
#: streaming-unit granularities: a whole decoder layer, or its attention and MLP halves
UNITS = ("layer", "half")


def layer_index(block: str) -> int | None:
    """The decoder layer number of a block name, or None for embed/head (and for a part of a layer)."""
    m = _LAYER.match(block)
    return int(m.group(1)) if m else None


def layer_part(unit: str) -> tuple[int, str] | None:
    """``("layers.3.attn")`` -> ``(3, "attn")``: the layer and part of a streaming unit finer than a layer."""
    m = _PART.match(unit)
    return (int(m.group(1)), m.group(2)) if m else None


@dataclass
class Context:
    """Per-forward values shared by every block and every pass (masks, positions, rotary tables).

    ``layer_kwargs[i]`` are the keyword arguments decoder layer ``i`` receives
    from the model's own forward. ``select`` (flat indices into batch×seq) makes
    the head compute logits for those positions only.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)
    select: torch.Tensor | None = None


class Adapter(ABC):
    """Base class of the model-family adapters.

    Args:
        config: the checkpoint's transformers config.
        dtype: the compute dtype (the store's dtype).
        device: where the blocks run; non-persistent buffers (rotary tables) are materialised there.
    """

    #: ``config.model_type`` values this adapter serves.
    model_types: tuple[str, ...] = ()
    #: whether positions are learned embeddings (a row longer than ``max_position_embeddings`` cannot run)
    learned_positions: bool = False

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        with init_empty_weights(include_buffers=False):
            self.skeleton: nn.Module = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.skeleton.eval()  # ZO passes run with dropout off (both passes of a step must see the same function)
        self._prefixes = {b: p for b, p in self.block_prefixes().items()}

    def replica(self) -> Adapter:
        """A copy that runs blocks on a skeleton of its own (``functional_call`` swaps a module's tensors while it
        runs, so blocks running concurrently need separate skeletons; the skeleton holds no weights)."""
        twin = copy.copy(self)
        twin.skeleton = copy.deepcopy(self.skeleton)
        return twin

    # ----------------------------------------------------------------- naming
    @abstractmethod
    def block_prefixes(self) -> dict[str, str]:
        """Block name -> the dotted module path of the submodule it runs ("" for composite blocks)."""

    @abstractmethod
    def block_of(self, tensor: str) -> str | None:
        """The block that stores ``tensor``, or None if the tensor is not part of the model."""

    def block_names(self) -> list[str]:
        """Blocks in execution order."""
        n = self.config.num_hidden_layers
        return [EMBED, *[f"layers.{i}" for i in range(n)], HEAD]

    def tied(self) -> dict[str, str]:
        """Alias tensor -> stored tensor for tied weights (the tie is one tensor, stored once)."""
        if getattr(self.config, "tie_word_embeddings", False):
            return {"lm_head.weight": self.embed_weight_name}
        return {}

    @property
    @abstractmethod
    def embed_weight_name(self) -> str:
        """Full name of the token-embedding matrix."""

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the model needs (tied aliases excluded) with its shape, from the meta skeleton."""
        aliases = self.tied()
        out = {}
        for name, t in self.skeleton.state_dict(keep_vars=True).items():
            if name not in aliases:
                out[name] = tuple(t.shape)
        return out

    def tensors_of(self, block: str) -> list[str]:
        """Names of the tensors ``block`` needs at run time, aliases included."""
        names = [n for n in self.expected_shapes() if self.block_of(n) == block]
        names += [alias for alias in self.tied() if self.block_of(alias) == block]
        return names

    def split(self, block: str, names: list[str], unit: str) -> list[tuple[str, list[str]]]:
        """The streaming units of ``block`` (stored tensors ``names``, in store order) at granularity ``unit``, in
        execution order: (unit name, its tensors). ``"layer"``: the block itself. ``"half"`` (families that run
        :meth:`run` on ``layers.<i>.attn`` / ``layers.<i>.mlp``): a decoder layer's attention half (the tensors
        :meth:`is_attention` names, with their norm) and MLP half; embed and head stay whole."""
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if unit == "layer" or layer_index(block) is None:
            return [(block, list(names))]
        sides = {n: self.is_attention(n) for n in names}
        if None in sides.values():
            raise ConfigError("--unit", repr(unit), f"{type(self).__name__} streams whole decoder layers only; "
                              "use --unit layer")
        attn = [n for n in names if sides[n]]
        return [(f"{block}.attn", attn), (f"{block}.mlp", [n for n in names if n not in attn])]

    def is_attention(self, tensor: str) -> bool | None:
        """Whether a decoder-layer tensor belongs to the attention half (see :meth:`split`); ``None`` (this
        default) for families whose :meth:`run` takes whole decoder layers only."""
        return None

    # ---------------------------------------------------------------- running
    @abstractmethod
    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              position_ids: torch.Tensor | None = None, select: torch.Tensor | None = None,
              cache: Any = None) -> Context:
        """Compute the per-forward context once (masks, positions, rotary tables).

        With ``position_ids=None`` positions count real tokens only
        (``cumsum(mask) - 1``, as OPT does), so left padding does not shift them.

        With a ``cache`` (a transformers ``Cache``, e.g. ``DynamicCache``) ``input_ids`` are the tokens after the
        cached ones, ``attention_mask`` covers the cached and the new tokens, and every decoder layer receives the
        cache, appends its keys and values to its own entry of it and attends to all of them (decoding).
        """

    @abstractmethod
    def run(self, block: str, tensors: Mapping[str, torch.Tensor], x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Run one block on one pass's state ``x`` with the given weights.

        Args:
            block: block name.
            tensors: full tensor name -> tensor for every tensor of the block (aliases included).
            x: input ids for ``embed``, the hidden state otherwise.
            ctx: the forward's context from :meth:`begin`.

        Returns:
            The next hidden state; for ``head`` the logits ([B, T, V], or [N, V] with ``ctx.select``).
        """

    # ---------------------------------------------------------------- helpers
    def call(self, module_path: str, tensors: Mapping[str, torch.Tensor], args: tuple, kwargs: dict | None = None):
        """``functional_call`` of the skeleton's submodule at ``module_path`` with full-name tensors."""
        module = self.skeleton.get_submodule(module_path)
        plen = len(module_path) + 1
        local = {n[plen:]: t for n, t in tensors.items() if n.startswith(module_path + ".")}
        return functional_call(module, local, args, kwargs or {}, strict=True, tie_weights=False)

    @staticmethod
    def default_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Positions of real tokens: 0..n-1 after any left padding; padding gets -1 (never attended). A mask longer
        than ``input_ids`` (cached tokens first) gives the positions of the last ``input_ids.shape[1]`` tokens."""
        if attention_mask is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        mask = attention_mask.long()
        return (mask.cumsum(-1) * mask - 1)[:, -input_ids.shape[1]:]

    @staticmethod
    def cache_keyword(module: nn.Module) -> str:
        """The keyword a transformers module's ``forward`` takes its KV cache by (``cache``; ``past_key_values``
        in older transformers)."""
        return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"

    def embeds_stand_in(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A zero-stride [B, T, H] stand-in for the embeddings: mask and rotary code only read its
        shape, dtype and device, so no buffer is allocated per forward."""
        b, t = input_ids.shape
        return torch.zeros((), dtype=self.dtype, device=self.device).expand(b, t, self.config.hidden_size)

    @staticmethod
    def select_rows(hidden: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
        """[B, T, H] -> [N, H] rows named by flat indices (or unchanged when select is None)."""
        if select is None:
            return hidden
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, select)
