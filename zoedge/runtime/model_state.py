"""The streamed model's weights as a whole: read (``state_dict``, weight / trained / merged streams for checkpoints
and exports), written (``load_state_dict``, ``load_trained``) and reset to the prepared store (``reset_to_base``).

:class:`ModelState` is a part of :class:`~zoedge.runtime.streamed.StreamedModel`, which sets the attributes it
declares; every method synchronises first, so it sees the weights after every enqueued pass.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from zoedge.errors import ConfigError
from zoedge.runtime.host import HostTier
from zoedge.runtime.lora import LoraAdapters
from zoedge.store.manifest import BlockEntry, dtype_of
from zoedge.store.safetensors_io import WeightStream


class ModelState:
    """Every weight of the model, block by block (a part of :class:`~zoedge.runtime.streamed.StreamedModel`)."""

    # set by StreamedModel
    blocks: list[BlockEntry]
    aliases: dict[str, str]
    tier: HostTier
    lora: LoraAdapters | None
    synchronize: Callable[[], None]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All current weights as CPU tensors (quantized ones dequantized), tied aliases included; with adapters
        attached, the frozen base's (the adapters: ``lora.state_dict()``, merged: :meth:`merged_stream`)."""
        self.synchronize()
        out: dict[str, torch.Tensor] = {}
        for i in range(len(self.blocks)):
            out.update({k: v.clone() for k, v in self._block_state(i).items()})
        for alias, src in self.aliases.items():
            out[alias] = out[src]
        return out

    def weight_stream(self) -> WeightStream:
        """The current weights block by block (tied aliases not repeated), for writing a checkpoint or an export
        of a model larger than memory: only one block's tensors are held at a time."""
        self.synchronize()
        entries = [(t.name, dtype_of(t.parts["data"].dtype if t.quant == "none" else t.dtype), tuple(t.shape))
                   for b in self.blocks for t in b.tensors]
        return WeightStream(entries, (self._block_state(i) for i in range(len(self.blocks))))

    def trained_stream(self) -> WeightStream:
        """What training changes, for a checkpoint: the adapters when attached, else every weight
        (:meth:`weight_stream`)."""
        if self.lora is None:
            return self.weight_stream()
        self.synchronize()
        return WeightStream.of(self.lora.state_dict())

    def load_trained(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trained_stream` (the adapters, or :meth:`load_state_dict`).

        Raises:
            ConfigError: a tensor is missing or has the wrong shape.
        """
        if self.lora is None:
            self.load_state_dict(state)
        else:
            self.synchronize()
            self.lora.load_state_dict(state)

    def merged_stream(self) -> WeightStream:
        """The model's weights with the adapters merged (W + scaling · B A; no adapters: :meth:`weight_stream`),
        block by block, for exporting a merged model."""
        stream = self.weight_stream()
        if self.lora is None:
            return stream
        lora = self.lora
        return WeightStream(stream.entries, ({n: lora.merged(n, t) for n, t in chunk.items()}
                                             for chunk in stream.chunks))

    def _block_state(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s tensors (views of its host bytes; quantized ones dequantized), after a synchronize."""
        from zoedge.store import quant as q
        host = self._read_block(i)
        out: dict[str, torch.Tensor] = {}
        for t in self.blocks[i].tensors:
            if t.quant == "none":
                p = t.parts["data"]
                out[t.name] = host[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).view(t.shape)
            else:
                parts = {k: host[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).view(p.shape)
                         for k, p in t.parts.items()}
                out[t.name] = q.dequantize(t.quant, parts, tuple(t.shape), dtype_of(t.dtype), t.blocksize)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the working copy (host tier) with ``state`` (e.g. weights from a checkpoint).

        Every unquantized stored tensor must be present; quantized tensors are left as stored (their
        trained state lives in the plugin). The prepared store on disk is never written.

        Raises:
            ConfigError: a tensor is missing or has the wrong shape.
        """
        self.tier.check_writable()
        self.synchronize()
        for i, b in enumerate(self.blocks):
            host = self._read_block(i)
            for t in b.tensors:
                if t.quant != "none":
                    continue
                value = state[t.name] if t.name in state else None  # read once: ``state`` may load lazily
                if value is None or tuple(value.shape) != tuple(t.shape):
                    got = tuple(value.shape) if value is not None else "missing"
                    raise ConfigError(t.name, f"checkpoint tensor is {got}, the model needs {tuple(t.shape)}",
                                      "resume from a checkpoint of the same model")
                p = t.parts["data"]
                host[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).copy_(value.reshape(-1))
            self.tier.write_block(i, host)

    def reset_to_base(self) -> None:
        """Make the weights the prepared store's again (the host tier drops trained changes; the store itself is
        never written): the start of a replay of logged updates."""
        self.synchronize()
        self.tier.reset_to_base()

    def _read_block(self, i: int) -> torch.Tensor:
        return self.tier.read_block(i)
