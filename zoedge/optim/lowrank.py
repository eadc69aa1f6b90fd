"""A weight seen as ``base + scale · U Vᵀ`` without ever forming the m×n product.

:class:`LowRankPerturbed` is a tensor subclass that shares ``base``'s storage.
When a module calls ``F.linear(x, W)`` with it (every ``nn.Linear`` does), the
product becomes ``x baseᵀ + scale · (x V) Uᵀ``: one base GEMM plus a rank-r
correction; ``F.embedding(ids, W)`` (``nn.Embedding``) becomes
``base[ids] + scale · U[ids] Vᵀ``. The base product runs with subclass dispatch on, so a base that forms its
values at the op (a quantized weight's :class:`~zoedge.runtime.dequantized.Dequantized` view: one matrix or row
chunk expanded at a time) composes with the low-rank term. Any other operation sees the materialised matrix (correct, just
not cheap), so a plugin may hand it to any module.

Shapes: base [m, n] (nn.Linear: m = out, n = in), U [m, r], V [n, r].
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from zoedge.runtime.rowview import call_formed


class LowRankPerturbed(torch.Tensor):
    """``base + scale · U Vᵀ`` applied lazily (see module docstring)."""

    base: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    scale: float

    @staticmethod
    def __new__(cls, base: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float) -> LowRankPerturbed:
        if base.ndim != 2 or u.shape != (base.shape[0], u.shape[1]) or v.shape != (base.shape[1], u.shape[1]):
            raise ValueError(f"low-rank shapes do not fit: base {tuple(base.shape)}, U {tuple(u.shape)}, "
                             f"V {tuple(v.shape)}")
        out = torch.Tensor._make_subclass(cls, base)
        out.base, out.u, out.v, out.scale = base, u, v, scale
        return out

    def materialize(self) -> torch.Tensor:
        """The dense m×n matrix (allocates)."""
        return torch.addmm(self.base, self.u, self.v.T, alpha=self.scale)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.data_ptr:  # the storage is base's (the runtime keeps tied views by reference)
            return args[0].base.data_ptr()
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, LowRankPerturbed) and not isinstance(x, LowRankPerturbed):
                # the base product with subclass dispatch on: a base (or bias) that forms its values at the op
                # (a quantized weight's Dequantized view, a perturbed bias) forms them here
                y = F.linear(x, w.base, bias)
                with torch._C.DisableTorchFunctionSubclass():
                    # y += scale · (x V) Uᵀ ; [.., n] @ [n, r] -> [.., r] @ [r, m] -> [.., m]
                    return y.add_(F.linear(F.linear(x, w.v.T), w.u), alpha=w.scale)

        if func is F.embedding:
            ids, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if isinstance(w, LowRankPerturbed) and not isinstance(ids, LowRankPerturbed):
                rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight")}
                y = F.embedding(ids, w.base, *args[2:], **rest)
                with torch._C.DisableTorchFunctionSubclass():
                    # rows of base + scale · U Vᵀ: [.., r] @ [r, n] -> [.., n]
                    return y.add_(F.embedding(ids, w.u) @ w.v.T, alpha=w.scale)

        return call_formed(func, args, kwargs, LowRankPerturbed)
