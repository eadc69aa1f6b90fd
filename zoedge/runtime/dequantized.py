"""A quantized weight seen as its values, expanded just in time at the op that reads it, one matrix or one chunk
of rows at a time.

:class:`Dequantized` is a tensor subclass over the stored parts of an int8 / nf4 tensor (views of a device slot,
or of a host buffer when blocks are bound in place); it has the tensor's shape, dtype and device, and nothing of
its size is allocated while it exists. Each op that reads it expands what it needs into a fresh buffer, with
zoedge's decode (:func:`zoedge.store.quant.dequantize_rows`: the same kernels and values as a whole-tensor
dequantisation):

* ``F.linear(x, W, b)`` (every ``nn.Linear``) runs over chunks of ``W``'s rows (output features) of at most
  ``chunk_bytes`` dequantized bytes: ``y[..., a:b] = x W[a:b]ᵀ + b[a:b]``; a matrix no larger than the chunk is
  expanded whole and multiplied by the unchunked op (bit-equal to a weight dequantized beforehand);
* ``F.embedding(ids, W)`` gathers each chunk's rows where the ids fall in it;
* any other op that reads values sees the whole dequantized tensor (correct, one tensor-sized buffer);
* an op that would change it in place is refused (a quantized tensor is read-only: train it through a low-rank
  plugin's factors).

A low-rank view over it (:class:`~zoedge.optim.lowrank.LowRankPerturbed`) computes its base product through this
one, so a low-rank plugin on a quantized store never forms the dequantized matrix whole (unless it fits a chunk).

The subclass's own storage is one NaN element (shared by every view on a device) broadcast to the shape: code
that reads it with subclass dispatch disabled gets NaNs, never plausible numbers.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from zoedge.errors import ConfigError
from zoedge.runtime import rowview
from zoedge.runtime.rowview import RowView
from zoedge.store import quant as q


def row_chunks(shape: torch.Size | tuple[int, ...], itemsize: int, chunk_bytes: int, blocksize: int
               ) -> Iterator[tuple[int, int]]:
    """Row ranges of at most ``chunk_bytes`` of dequantized values (see :func:`zoedge.runtime.rowview.row_chunks`)
    starting on quantization-block boundaries where they fit, so a range expands only its own blocks."""
    return rowview.row_chunks(shape, itemsize, chunk_bytes, blocksize)


_POISONS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _poison(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One NaN of ``dtype`` on ``device``, shared by every view (its storage; created once)."""
    key = (device, dtype)
    if key not in _POISONS:
        _POISONS[key] = torch.full((), float("nan"), dtype=dtype, device=device)
    return _POISONS[key]


class Dequantized(RowView):
    """A quantized tensor's values, formed by the op that reads them (see the module docstring)."""

    kind: str
    parts: dict[str, torch.Tensor]
    blocksize: int
    chunk_bytes: int
    label: str

    @staticmethod
    def __new__(cls, kind: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...] | list[int],
                dtype: torch.dtype, blocksize: int, chunk_bytes: int, label: str = "") -> Dequantized:
        shape = tuple(shape)
        q.check_parts(kind, parts, shape, blocksize)
        if kind == "none" or len(shape) != 2:
            raise ValueError(f"Dequantized views int8 / nf4 matrices, got {kind} {shape}")
        out = torch.Tensor._make_subclass(cls, _poison(parts["data"].device, dtype).expand(shape))
        out.kind, out.parts, out.blocksize, out.chunk_bytes, out.label = kind, parts, blocksize, chunk_bytes, label
        out.value_shape, out.value_dtype = shape, dtype
        return out

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` dequantized into a fresh buffer."""
        return q.dequantize_rows(self.kind, self.parts, self.value_shape, self.value_dtype, self.blocksize, a, b)

    def chunks(self) -> list[tuple[int, int]]:
        return list(row_chunks(self.value_shape, self.value_dtype.itemsize, self.chunk_bytes, self.blocksize))

    @classmethod
    def metadata(cls, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        """Shape, dtype, device, ...: nothing formed; a property that is a tensor (``.T``, ``.mT``, ``.data``): of
        the values."""
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if not (name == "__get__" and isinstance(out, torch.Tensor)):
            return out
        with torch._C.DisableTorchFunctionSubclass():
            return func(args[0].materialize(), *args[1:], **kwargs)

    @classmethod
    def check_op(cls, name: str, args: tuple, kwargs: dict) -> None:
        """Refuse an op that would change a quantized tensor in place."""
        target = args[0] if args else None
        if (name.endswith("_") and not name.startswith("__") or name in ("__setitem__", "__iadd__", "__isub__",
                                                                          "__imul__", "__itruediv__")) \
                and isinstance(target, Dequantized) or isinstance(kwargs.get("out"), Dequantized):
            w = target if isinstance(target, Dequantized) else kwargs["out"]
            raise ConfigError(w.label or "a quantized tensor", f"is stored quantized ({w.kind}): {name} cannot "
                              "change it in place", "train it through a low-rank optimizer's factors (hzo), or "
                              "prepare the store with --quant none")
