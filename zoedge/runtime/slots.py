"""Device slots: flat device buffers, allocated once, that blocks take turns to occupy.

A slot is sized to the largest block it can hold. A block's tensors are typed
views into the slot's buffer at the offsets the manifest gives, so binding a
block costs no copy and no allocation; views are cached per (slot, block).
Quantized tensors additionally get a dequantization area in the slot and are
expanded there on the compute stream right after the upload.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoedge.runtime.memory import allocate
from zoedge.store import quant as q
from zoedge.store.manifest import BlockEntry, align, dtype_of


@dataclass
class Slot:
    """One device buffer (``slot[index]`` in the schedule) and its dequantization area (``dequant[index]``).

    Its reuse is ordered by the schedule's waits (see :mod:`zoedge.runtime.schedule`), not by the slot.
    """

    index: int
    raw: torch.Tensor
    dequant: torch.Tensor | None
    block: int | None = None
    views: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    parts: dict[int, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)


def make_slot(index: int, raw_bytes: int, dequant_bytes: int, device: torch.device) -> Slot:
    raw = allocate(raw_bytes, device, "slot")
    dq = allocate(dequant_bytes, device, "slot") if dequant_bytes else None
    return Slot(index, raw, dq)


def _view(buf: torch.Tensor, offset: int, dtype: str, shape: list[int]) -> torch.Tensor:
    dt = dtype_of(dtype)
    n = 1
    for d in shape:
        n *= d
    return buf[offset:offset + n * dt.itemsize].view(dt).view(shape)


def bind(slot: Slot, i: int, block: BlockEntry) -> dict[str, torch.Tensor]:
    """Tensor name -> view in ``slot`` for block ``i`` (created once, then cached)."""
    if i not in slot.views:
        views, parts, dq_off = {}, {}, 0
        for t in block.tensors:
            if t.quant == "none":
                p = t.parts["data"]
                views[t.name] = _view(slot.raw, p.offset, p.dtype, t.shape)
            else:
                assert slot.dequant is not None
                views[t.name] = _view(slot.dequant, dq_off, t.dtype, t.shape)
                dq_off = align(dq_off + t.numel * dtype_of(t.dtype).itemsize)
                parts[t.name] = {k: _view(slot.raw, p.offset, p.dtype, p.shape) for k, p in t.parts.items()}
        slot.views[i], slot.parts[i] = views, parts
    return slot.views[i]


def dequantize(slot: Slot, i: int, block: BlockEntry) -> None:
    """Expand block ``i``'s quantized tensors into their views (the compute queue)."""
    views = bind(slot, i, block)
    for t in block.tensors:
        if t.quant != "none":
            q.dequantize_into(t.quant, slot.parts[i][t.name], views[t.name], t.blocksize)
