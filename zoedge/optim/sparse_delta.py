"""A weight seen as ``base + Δ`` where Δ is sparse (k fixed entries), trained without a dense gradient.

Used by hybrid methods that train a random fraction of a weight's entries first-order (LoHO, intra-layer).
:class:`SparseDeltaWeight` shares ``base``'s storage; ``F.linear(x, W)`` with it computes

    y = x baseᵀ + (x[..., cols] · Δ) summed into y[..., rows]

and the backward gives ∂L/∂Δ = Σ_tokens ∂L/∂y[..., rows] · x[..., cols] (a sampled dense-dense product): the
memory of the Δ path is O(tokens · k), never the m×n dense gradient of the weight. Any other operation sees
the materialised matrix (correct, not cheap).

Shapes: base [m, n], rows / cols / delta [k] (entry j of Δ sits at (rows[j], cols[j])).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from zoedge.runtime.rowview import call_formed


def sample_entries(shape: tuple[int, int], fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``round(fraction · m·n)`` distinct random entries (rows, cols) of an m×n matrix, sorted by flat index."""
    m, n = shape
    k = int(round(fraction * m * n))
    flat = torch.randperm(m * n, generator=generator)[:k].sort().values
    return flat // n, flat % n


class _SparseLinear(torch.autograd.Function):
    """y[..., rows[j]] += x[..., cols[j]] · Δ[j]; grads for x and Δ only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor,
                m: int) -> torch.Tensor:
        ctx.save_for_backward(x, rows, cols, delta)
        contrib = x.index_select(-1, cols) * delta                     # [..., k]
        return torch.zeros(*x.shape[:-1], m, dtype=x.dtype, device=x.device).index_add_(-1, rows, contrib)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None, None]:
        x, rows, cols, delta = ctx.saved_tensors
        g_rows = gy.index_select(-1, rows)                             # [..., k]
        g_delta = (g_rows * x.index_select(-1, cols)).reshape(-1, rows.numel()).sum(0)  # SDDMM: [k]
        g_x = torch.zeros_like(x).index_add_(-1, cols, g_rows * delta) if ctx.needs_input_grad[0] else None
        return g_x, None, None, g_delta, None


class SparseDeltaWeight(torch.Tensor):
    """``base + Δ`` with Δ on k fixed entries (see the module docstring)."""

    base: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    delta: torch.Tensor

    @staticmethod
    def __new__(cls, base: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                delta: torch.Tensor) -> SparseDeltaWeight:
        if base.ndim != 2 or not rows.shape == cols.shape == delta.shape:
            raise ValueError(f"sparse delta shapes do not fit: base {tuple(base.shape)}, rows {tuple(rows.shape)}, "
                             f"cols {tuple(cols.shape)}, delta {tuple(delta.shape)}")
        out = torch.Tensor._make_subclass(cls, base.detach())
        out.base, out.rows, out.cols, out.delta = base, rows, cols, delta
        return out

    def materialize(self) -> torch.Tensor:
        """The dense m×n matrix (allocates; differentiable in Δ)."""
        n = self.base.shape[1]
        return self.base.flatten().index_add(0, self.rows * n + self.cols, self.delta).view_as(self.base)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, SparseDeltaWeight) and not isinstance(x, SparseDeltaWeight):
                with torch._C.DisableTorchFunctionSubclass():
                    y = F.linear(x, w.base, bias)
                    return y + _SparseLinear.apply(x, w.rows, w.cols, w.delta, w.base.shape[0])

        return call_formed(func, args, kwargs, SparseDeltaWeight)
