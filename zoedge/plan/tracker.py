"""Device memory counted exactly, on any machine: live and peak bytes of the storages of one device.

:class:`DeviceMemoryTracker` is a ``TorchDispatchMode``: every aten op's output
tensors are looked at, each new storage on the tracked device is counted once
(``untyped_storage().nbytes()``) and uncounted when Python frees it (a weak
reference finaliser). The peak of the live total is what the same sequence of
ops needs from the device's allocator, before its rounding. Run on the
``meta`` device (no memory, no compute: a real-width decoder layer runs in well
under a second) or on real CPU tensors.

Data-dependent scalars read on the meta device (``.item()``, ``.all()`` in a
mask builder) read as 0 / False: masks are then built as for a padded batch;
copies from the meta device into real (host) tensors copy nothing.

Tensors that exist before the tracker starts are not counted (weights of a
plan's meta model, for example); :meth:`DeviceMemoryTracker.add` counts one
explicitly.

The attention implementation changes the peak by gigabytes (the S×S scores of
an eager / math attention against the O(S) state of a fused one), and on the
meta device ``scaled_dot_product_attention`` always decomposes into the math
form. :class:`FusedAttention` (active inside the tracker when
``attention="sdpa"``) routes meta-device sdpa calls to the fused CPU flash
kernel's meta function, whose outputs (the attention output and one fp32
log-sum-exp per query) are what a fused kernel keeps: what CUDA's flash /
memory-efficient kernels and the CPU's flash kernel allocate.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

ATTENTIONS = ("sdpa", "eager")


class FusedAttention(TorchFunctionMode):
    """Meta-device ``F.scaled_dot_product_attention`` computed as a fused (flash-style) kernel would."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].is_meta:
            return _fused_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def _fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
    if enable_gqa and k.shape[-3] != q.shape[-3]:  # grouped-query: the kernel reads shared heads (stride-0 view)
        rep = q.shape[-3] // k.shape[-3]
        k = k.unsqueeze(-3).expand(*k.shape[:-2], rep, *k.shape[-2:]).flatten(-4, -3)
        v = v.unsqueeze(-3).expand(*v.shape[:-2], rep, *v.shape[-2:]).flatten(-4, -3)
    out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return out


class DeviceMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of storages on ``device`` created while the tracker is active.

    Args:
        device: the device type to count (``"meta"``, ``"cpu"``, ``"cuda"``).
        attention: ``"sdpa"`` (fused attention kernels; meta-device sdpa is routed to one) or ``"eager"``
            (whatever the model computes: HF's eager attention materialises the S×S scores).

    Use as a context manager; ``peak`` and ``live`` are bytes. :meth:`section` measures the peak of a
    stretch above the live bytes at its start.
    """

    def __init__(self, device: str = "meta", attention: str = "sdpa") -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.device_type = torch.device(device).type
        self.attention = attention
        self.live = 0
        self.peak = 0
        self.allocations = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._sections: list[list[int]] = []
        self._attn: FusedAttention | None = None
        self._uncounted = 0

    # ------------------------------------------------------------------ counting
    def add(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage (once), e.g. a tensor created before the tracker started."""
        if t.device.type != self.device_type or isinstance(t, torch._subclasses.FakeTensor):
            return
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = st.nbytes()
        cell = [n]  # bytes this storage counts for; 0 once discounted
        self._seen[st] = cell
        weakref.finalize(st, self._free, cell)
        self.live += n
        self.allocations += 1
        if self.live > self.peak:
            self.peak = self.live
        for s in self._sections:
            s[1] = max(s[1], self.live)

    def _free(self, cell: list[int]) -> None:
        self.live -= cell[0]

    def discount(self, tensors: Iterable[torch.Tensor]) -> int:
        """Stop counting these tensors' storages and remove them from the live and peak bytes, e.g. a meta model
        skeleton built while the tracker ran (it holds no device memory). They must have lived since before the
        current peak. Returns the bytes removed."""
        removed = 0
        for t in tensors:
            if t.device.type != self.device_type:
                continue
            cell = self._seen.get(t.untyped_storage())
            if cell is not None and cell[0]:
                removed += cell[0]
                cell[0] = 0
        self.live -= removed
        self.peak -= removed
        return removed

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            # A data-dependent branch on the meta device (e.g. "is the padding mask all ones?"): answer 0 / False,
            # which builds masks as for a padded batch (the larger, conservative case).
            return False if args[0].dtype == torch.bool else 0
        if func is torch.ops.aten.copy_.default and args[1].is_meta and not args[0].is_meta:
            return args[0]  # a device -> host copy (write-back) from a device that holds no values
        out = func(*args, **(kwargs or {}))
        if self._uncounted:
            return out
        inputs = [a.untyped_storage() for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type == self.device_type]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                st = t.untyped_storage()
                if not any(st is i for i in inputs):  # a view / in-place result allocates nothing
                    self.add(t)
        return out

    # ------------------------------------------------------------------ context
    def __enter__(self) -> DeviceMemoryTracker:
        if self.attention == "sdpa":
            self._attn = FusedAttention()
            self._attn.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._attn is not None:
            self._attn.__exit__(*exc)
            self._attn = None

    @contextlib.contextmanager
    def section(self) -> Iterator[dict[str, int]]:
        """Yields a dict filled on exit with ``start`` (live bytes at entry) and ``peak`` (the stretch's peak)."""
        rec = [self.live, self.live]
        self._sections.append(rec)
        result: dict[str, int] = {}
        try:
            yield result
        finally:
            self._sections.remove(rec)
            result.update(start=rec[0], peak=rec[1], above=rec[1] - rec[0])

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Storages created inside are never counted (host memory that lives on the tracked device type, as on the
        CPU: the optimizer's state on the host tier)."""
        self._uncounted += 1
        try:
            yield
        finally:
            self._uncounted -= 1

    def reset_peak(self) -> None:
        """Start a new peak from the live bytes now."""
        self.peak = self.live
