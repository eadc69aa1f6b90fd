"""A tensor whose values are formed just in time, a chunk of rows at a time, by the op that reads them.

:class:`RowView` is the shared base of :class:`~zoedge.runtime.perturbed.NoisePerturbed` (``θ + α·z`` from
counter-based noise) and :class:`~zoedge.runtime.dequantized.Dequantized` (an int8 / nf4 tensor's values). A
subclass says how to form rows ``[a, b)`` of its values (:meth:`RowView.rows`) and how the rows are chunked;
this class routes the ops that read it:

* ``F.linear(x, W, b)`` (every ``nn.Linear``, and a tied LM head) runs over chunks of ``W``'s rows (output
  features): ``y[..., a:b] = x W[a:b]ᵀ + b[a:b]``; a ``W`` that fits one chunk is formed whole and multiplied by
  the unchunked op (bit-equal to a weight formed beforehand); a bias that is itself a view is formed per chunk;
* ``F.embedding(ids, W)`` gathers each chunk's rows where the ids fall in it;
* any other op sees the whole formed tensor (correct, one tensor-sized buffer).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

#: tensor methods that read metadata only (nothing is formed for them)
METADATA = frozenset({"size", "dim", "stride", "numel", "element_size", "is_contiguous", "data_ptr",
                      "storage_offset", "__len__", "untyped_storage", "is_floating_point", "is_complex",
                      "get_device", "nelement"})


def row_chunks(shape: torch.Size | tuple[int, ...], itemsize: int, chunk_bytes: int, align: int = 1
               ) -> Iterator[tuple[int, int]]:
    """Row ranges ``[a, b)`` of a tensor of ``shape`` with at most ``chunk_bytes`` each (at least one row; a 1-D
    tensor's rows are its elements). Where a whole number of ``align``-element units' rows fits in
    ``chunk_bytes``, ranges start on unit boundaries (the noise's chunks, a quantization's blocks), so forming a
    range touches only its own units."""
    rows = shape[0] if len(shape) else 1
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, chunk_bytes // max(1, itemsize * row))
    aligned = math.lcm(row, align) // row  # rows per whole number of units
    if step >= aligned:
        step -= step % aligned
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


class RowView(torch.Tensor):
    """Values formed by the op that reads them, a chunk of rows at a time (see the module docstring).

    A subclass sets ``value_shape`` / ``value_dtype`` when it is made and defines ``rows(a, b)`` (rows ``[a, b)``
    of the values in a fresh buffer), ``chunks()`` (the row ranges an op forms one at a time) and the classmethod
    ``metadata(func, name, args, kwargs)`` (answers a metadata query, ``name`` in :data:`METADATA` or a property
    ``__get__``, without forming values); optionally ``check_op`` (e.g. to refuse an in-place op).
    """

    #: the values' shape and dtype (the subclass's metadata, without dispatch)
    value_shape: tuple[int, ...]
    value_dtype: torch.dtype

    def materialize(self) -> torch.Tensor:
        """The whole tensor's values (one tensor-sized buffer)."""
        return self.rows(0, self.value_shape[0] if self.value_shape else 1)  # type: ignore[attr-defined]

    @classmethod
    def check_op(cls, name: str, args: tuple, kwargs: dict) -> None:
        """Called before an op other than linear / embedding forms the values (e.g. to refuse an in-place op)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in METADATA or name == "__get__":
            return cls.metadata(func, name, args, kwargs)  # type: ignore[attr-defined]
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, RowView) and not isinstance(x, RowView):
                return _linear(x, w, bias)
        if func is F.embedding:
            ids, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight")}
            if isinstance(w, RowView) and not isinstance(ids, RowView) and rest.get("max_norm") is None \
                    and not (len(args) > 3 and args[3] is not None):
                return _embedding(ids, w, args[2:], rest)
        cls.check_op(name, args, kwargs)
        return call_formed(func, args, kwargs, RowView)


def call_formed(func: Any, args: tuple, kwargs: dict, view: type) -> Any:
    """``func`` on the arguments with every ``view`` among them formed whole (``materialize()``): the fallback of
    the lazily formed tensor subclasses (these, the low-rank and sparse-delta weights) for ops they do not route."""
    def formed(a: Any) -> Any:
        return a.materialize() if isinstance(a, view) else a

    with torch._C.DisableTorchFunctionSubclass():
        return func(*(formed(a) for a in args), **{k: formed(v) for k, v in kwargs.items()})


def _linear(x: torch.Tensor, w: RowView, bias: torch.Tensor | None) -> torch.Tensor:
    chunks = w.chunks()
    m = w.value_shape[0]
    if bias is not None and not isinstance(bias, RowView) and hasattr(bias, "materialize"):
        bias = bias.materialize()  # another kind of lazily formed view (a 1-D bias): formed once, whole

    def bias_rows(a: int, b: int) -> torch.Tensor | None:
        if bias is None:
            return None
        return bias.rows(a, b) if isinstance(bias, RowView) else bias[a:b]

    with torch._C.DisableTorchFunctionSubclass():
        if len(chunks) == 1:
            return F.linear(x, w.materialize(), bias_rows(0, m))
        y = torch.empty((*x.shape[:-1], m), dtype=torch.promote_types(x.dtype, w.value_dtype), device=x.device)
        for a, b in chunks:
            y[..., a:b] = F.linear(x, w.rows(a, b), bias_rows(a, b))
        return y


def _embedding(ids: torch.Tensor, w: RowView, args: tuple, kwargs: dict) -> torch.Tensor:
    chunks = w.chunks()
    with torch._C.DisableTorchFunctionSubclass():
        if len(chunks) == 1:
            return F.embedding(ids, w.materialize(), *args, **kwargs)
        out = torch.zeros((*ids.shape, w.value_shape[1]), dtype=w.value_dtype, device=ids.device)
        for a, b in chunks:
            rows = w.rows(a, b)
            part = F.embedding((ids - a).clamp_(0, b - a - 1), rows)
            inside = ((ids >= a) & (ids < b)).unsqueeze(-1)
            torch.where(inside, part, out, out=out)
        return out
