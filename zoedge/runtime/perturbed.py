"""A weight seen as ``θ + α·z``, with ``z`` regenerated from counter-based noise right before the op that reads it.

:class:`NoisePerturbed` is a tensor subclass sharing ``θ``'s storage (like
:class:`~zoedge.optim.lowrank.LowRankPerturbed`). Nothing is formed when a plugin
returns it from ``perturb``; each op that reads it forms ``θ + α·z`` into a
fresh buffer of at most one tensor, or of one chunk of rows:

* ``F.linear(x, W, b)`` (every ``nn.Linear``, and a tied LM head) runs over
  chunks of ``W``'s rows (output features): ``y[..., a:b] = x W[a:b]ᵀ + b[a:b]``;
* ``F.embedding(ids, W)`` gathers each chunk's rows where the ids fall in it;
* any other op (layer norms, RMS norms, positions) sees the whole perturbed tensor.

``fill(out, start, total)`` writes elements ``[start, start + out.numel())`` of
the flattened noise of a tensor of ``total`` elements (e.g.
:meth:`~zoedge.optim.noise.NoiseSource.normal_at_`), so a chunk's noise is the
same numbers as the corresponding part of a whole-tensor draw, and forming a
chunk costs one chunk-sized buffer: the noise is drawn into it and ``θ`` added in
place (``torch.add(θ, z, alpha=α, out=z)``, the op a workspace-based
perturbation uses, so the weights are bit-identical). A tensor no larger than
the chunk is formed in one piece, so its op is the unchunked one.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from zoedge.optim.noise import CHUNK

#: ``fill(out, start, total)``: elements [start, start + out.numel()) of a tensor's noise, written into ``out``
Fill = Callable[[torch.Tensor, int, int], torch.Tensor]

_METADATA = {"size", "dim", "stride", "numel", "element_size", "is_contiguous", "data_ptr", "storage_offset",
             "__len__", "untyped_storage", "is_floating_point", "is_complex", "get_device", "nelement"}


def row_chunks(shape: torch.Size | tuple[int, ...], itemsize: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Row ranges ``[a, b)`` of a tensor of ``shape`` with at most ``chunk_bytes`` each (at least one row; a 1-D
    tensor's rows are its elements). Where a multiple of the noise's own chunks (:data:`zoedge.optim.noise.CHUNK`
    elements) fits in ``chunk_bytes``, ranges start on noise-chunk boundaries, so forming a range draws only its
    own noise (otherwise the noise chunks it cuts are drawn whole into a temporary of at most one noise chunk)."""
    rows = shape[0] if len(shape) else 1
    row = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
    step = max(1, chunk_bytes // max(1, itemsize * row))
    aligned = math.lcm(row, CHUNK) // row  # rows per whole number of noise chunks
    if step >= aligned:
        step -= step % aligned
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


class NoisePerturbed(torch.Tensor):
    """``base + alpha · z`` formed just in time (see the module docstring)."""

    base: torch.Tensor
    fill: Fill
    alpha: float
    chunk_bytes: int

    @staticmethod
    def __new__(cls, base: torch.Tensor, fill: Fill, alpha: float, chunk_bytes: int) -> NoisePerturbed:
        out = torch.Tensor._make_subclass(cls, base)
        out.base, out.fill, out.alpha, out.chunk_bytes = base, fill, alpha, chunk_bytes
        return out

    def rows(self, a: int, b: int) -> torch.Tensor:
        """``base[a:b] + alpha · z[a:b]`` in a fresh buffer (rows of the first dimension)."""
        base = self.base
        if base.ndim == 0:
            out = torch.empty_like(base)
            return torch.add(base, self.fill(out, 0, 1), alpha=self.alpha, out=out)
        part = base[a:b]
        out = torch.empty(part.shape, dtype=base.dtype, device=base.device)
        row = part[0].numel() if part.ndim > 1 and len(part) else 1
        self.fill(out, a * row, base.numel())
        return torch.add(part, out, alpha=self.alpha, out=out)

    def chunks(self) -> list[tuple[int, int]]:
        return list(row_chunks(self.base.shape, self.base.element_size(), self.chunk_bytes))

    def materialize(self) -> torch.Tensor:
        """The whole perturbed tensor (one tensor-sized buffer)."""
        return self.rows(0, self.base.shape[0] if self.base.ndim else 1)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _METADATA or name == "__get__":  # shape, dtype, device, ...: the base's, nothing formed
            with torch._C.DisableTorchFunctionSubclass():
                return func(*[a.base if isinstance(a, NoisePerturbed) else a for a in args], **kwargs)
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, NoisePerturbed) and not isinstance(x, NoisePerturbed):
                return _linear(x, w, bias)
        if func is F.embedding:
            ids, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight")}
            if isinstance(w, NoisePerturbed) and not isinstance(ids, NoisePerturbed) and rest.get("max_norm") is None \
                    and not (len(args) > 3 and args[3] is not None):
                return _embedding(ids, w, args[2:], rest)

        def plain(a: Any) -> Any:
            return a.materialize() if isinstance(a, NoisePerturbed) else a

        args = tuple(plain(a) for a in args)
        kwargs = {k: plain(v) for k, v in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _linear(x: torch.Tensor, w: NoisePerturbed, bias: torch.Tensor | None) -> torch.Tensor:
    chunks = w.chunks()

    def bias_rows(a: int, b: int) -> torch.Tensor | None:
        if bias is None:
            return None
        if isinstance(bias, NoisePerturbed):
            return bias.rows(a, b)
        return bias[a:b]

    with torch._C.DisableTorchFunctionSubclass():
        if len(chunks) == 1:
            return F.linear(x, w.materialize(), bias_rows(0, w.base.shape[0]))
        y = torch.empty((*x.shape[:-1], w.base.shape[0]), dtype=torch.result_type(x, w.base), device=x.device)
        for a, b in chunks:
            y[..., a:b] = F.linear(x, w.rows(a, b), bias_rows(a, b))
        return y


def _embedding(ids: torch.Tensor, w: NoisePerturbed, args: tuple, kwargs: dict) -> torch.Tensor:
    chunks = w.chunks()
    with torch._C.DisableTorchFunctionSubclass():
        if len(chunks) == 1:
            return F.embedding(ids, w.materialize(), *args, **kwargs)
        out = torch.zeros((*ids.shape, w.base.shape[1]), dtype=w.base.dtype, device=ids.device)
        for a, b in chunks:
            rows = w.rows(a, b)
            part = F.embedding((ids - a).clamp_(0, b - a - 1), rows)
            inside = ((ids >= a) & (ids < b)).unsqueeze(-1)
            torch.where(inside, part, out, out=out)
        return out
