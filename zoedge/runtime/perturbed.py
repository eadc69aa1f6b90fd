"""A weight seen as ``θ + α·z``, with ``z`` regenerated from counter-based noise right before the op that reads it.

:class:`NoisePerturbed` is a :class:`~zoedge.runtime.rowview.RowView` sharing ``θ``'s storage (like
:class:`~zoedge.optim.lowrank.LowRankPerturbed`). Nothing is formed when a plugin
returns it from ``perturb``; each op that reads it forms ``θ + α·z`` into a
fresh buffer of at most one tensor, or of one chunk of rows (linear and
embedding chunk by chunk, any other op whole: see :mod:`zoedge.runtime.rowview`).

``fill(out, start, total)`` writes elements ``[start, start + out.numel())`` of
the flattened noise of a tensor of ``total`` elements (e.g.
:meth:`~zoedge.noise.source.NoiseSource.normal_at_`), so a chunk's noise is the
same numbers as the corresponding part of a whole-tensor draw, and forming a
chunk costs one chunk-sized buffer: the noise is drawn into it and ``θ`` added in
place (``torch.add(θ, z, alpha=α, out=z)``, the op a workspace-based
perturbation uses, so the weights are bit-identical). A tensor no larger than
the chunk is formed in one piece, so its op is the unchunked one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from zoedge.noise.source import CHUNK
from zoedge.runtime import rowview
from zoedge.runtime.rowview import RowView

#: ``fill(out, start, total)``: elements [start, start + out.numel()) of a tensor's noise, written into ``out``
Fill = Callable[[torch.Tensor, int, int], torch.Tensor]


def row_chunks(shape: torch.Size | tuple[int, ...], itemsize: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Row ranges of at most ``chunk_bytes`` (see :func:`zoedge.runtime.rowview.row_chunks`) aligned to the noise's
    own chunks (:data:`zoedge.noise.source.CHUNK` elements) where they fit, so forming a range draws only its own
    noise (otherwise the noise chunks it cuts are drawn whole into a temporary of at most one noise chunk)."""
    return rowview.row_chunks(shape, itemsize, chunk_bytes, CHUNK)


class NoisePerturbed(RowView):
    """``base + alpha · z`` formed just in time (see the module docstring)."""

    base: torch.Tensor
    fill: Fill
    alpha: float
    chunk_bytes: int

    @staticmethod
    def __new__(cls, base: torch.Tensor, fill: Fill, alpha: float, chunk_bytes: int) -> NoisePerturbed:
        out = torch.Tensor._make_subclass(cls, base)
        out.base, out.fill, out.alpha, out.chunk_bytes = base, fill, alpha, chunk_bytes
        out.value_shape, out.value_dtype = tuple(base.shape), base.dtype
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

    @classmethod
    def metadata(cls, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        """Shape, dtype, device, ...: the base's, nothing formed."""
        with torch._C.DisableTorchFunctionSubclass():
            return func(*[a.base if isinstance(a, NoisePerturbed) else a for a in args], **kwargs)
