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

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from zoedge.errors import ConfigError
from zoedge.store import quant as q

_METADATA = {"size", "dim", "stride", "numel", "element_size", "is_contiguous", "data_ptr", "storage_offset",
             "__len__", "untyped_storage", "is_floating_point", "is_complex", "get_device", "nelement"}


def row_chunks(shape: torch.Size | tuple[int, ...], itemsize: int, chunk_bytes: int, blocksize: int
               ) -> Iterator[tuple[int, int]]:
    """Row ranges ``[a, b)`` with at most ``chunk_bytes`` of dequantized values each (at least one row). Where a
    whole number of quantization blocks' rows fits, ranges start on block boundaries, so a range expands only its
    own blocks."""
    rows = shape[0]
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, chunk_bytes // max(1, itemsize * row))
    aligned = math.lcm(row, blocksize) // row
    if step >= aligned:
        step -= step % aligned
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


_POISONS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _poison(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One NaN of ``dtype`` on ``device``, shared by every view (its storage; created once)."""
    key = (device, dtype)
    if key not in _POISONS:
        _POISONS[key] = torch.full((), float("nan"), dtype=dtype, device=device)
    return _POISONS[key]


class Dequantized(torch.Tensor):
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
        return out

    @property
    def _shape(self) -> tuple[int, ...]:
        with torch._C.DisableTorchFunctionSubclass():
            return tuple(self.shape)

    @property
    def _dtype(self) -> torch.dtype:
        with torch._C.DisableTorchFunctionSubclass():
            return self.dtype

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` dequantized into a fresh buffer."""
        return q.dequantize_rows(self.kind, self.parts, self._shape, self._dtype, self.blocksize, a, b)

    def chunks(self) -> list[tuple[int, int]]:
        return list(row_chunks(self._shape, self._dtype.itemsize, self.chunk_bytes, self.blocksize))

    def materialize(self) -> torch.Tensor:
        """The whole dequantized tensor (one tensor-sized buffer)."""
        return self.rows(0, self._shape[0])

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _METADATA or name == "__get__":  # shape, dtype, device, ...: nothing formed
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            if not (name == "__get__" and isinstance(out, torch.Tensor)):
                return out
            # a property that is a tensor (.T, .mT, .data): of the values
            with torch._C.DisableTorchFunctionSubclass():
                return func(args[0].materialize(), *args[1:], **kwargs)
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, Dequantized) and not isinstance(x, Dequantized):
                return _linear(x, w, bias)
        if func is F.embedding:
            ids, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight")}
            if isinstance(w, Dequantized) and not isinstance(ids, Dequantized) and rest.get("max_norm") is None \
                    and not (len(args) > 3 and args[3] is not None):
                return _embedding(ids, w, args[2:], rest)
        target = args[0] if args else None
        if (name.endswith("_") and not name.startswith("__") or name in ("__setitem__", "__iadd__", "__isub__",
                                                                          "__imul__", "__itruediv__")) \
                and isinstance(target, Dequantized) or isinstance(kwargs.get("out"), Dequantized):
            w = target if isinstance(target, Dequantized) else kwargs["out"]
            raise ConfigError(w.label or "a quantized tensor", f"is stored quantized ({w.kind}): {name} cannot "
                              "change it in place", "train it through a low-rank optimizer's factors (hzo), or "
                              "prepare the store with --quant none")

        def plain(a: Any) -> Any:
            return a.materialize() if isinstance(a, Dequantized) else a

        args = tuple(plain(a) for a in args)
        kwargs = {k: plain(v) for k, v in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _plain_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A bias that is itself a lazily formed view (a perturbed bias) is formed once, whole (it is 1-D)."""
    if bias is None or type(bias) is torch.Tensor:
        return bias
    return bias.materialize() if hasattr(bias, "materialize") else bias


def _linear(x: torch.Tensor, w: Dequantized, bias: torch.Tensor | None) -> torch.Tensor:
    chunks = w.chunks()
    bias = _plain_bias(bias)
    m = w._shape[0]
    with torch._C.DisableTorchFunctionSubclass():
        if len(chunks) == 1:
            return F.linear(x, w.materialize(), bias)
        y = torch.empty((*x.shape[:-1], m), dtype=torch.promote_types(x.dtype, w._dtype), device=x.device)
        for a, b in chunks:
            y[..., a:b] = F.linear(x, w.rows(a, b), None if bias is None else bias[a:b])
        return y


def _embedding(ids: torch.Tensor, w: Dequantized, args: tuple, kwargs: dict) -> torch.Tensor:
    chunks = w.chunks()
    with torch._C.DisableTorchFunctionSubclass():
        if len(chunks) == 1:
            return F.embedding(ids, w.materialize(), *args, **kwargs)
        out = torch.zeros((*ids.shape, w._shape[1]), dtype=w._dtype, device=ids.device)
        for a, b in chunks:
            rows = w.rows(a, b)
            part = F.embedding((ids - a).clamp_(0, b - a - 1), rows)
            inside = ((ids >= a) & (ids < b)).unsqueeze(-1)
            torch.where(inside, part, out, out=out)
        return out
