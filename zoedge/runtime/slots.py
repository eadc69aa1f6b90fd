"""Device slots: flat device buffers, allocated once, that blocks take turns to occupy.

A slot is sized to the largest block it can hold. A block's tensors are typed
views into the slot's buffer at the offsets the manifest gives, so binding a
block costs no copy and no allocation; views are cached per (slot, block).
A quantized tensor stays quantized in the slot: its view is a
:class:`~zoedge.runtime.dequantized.Dequantized` over its stored parts, expanded
one matrix or row chunk at a time by the op that reads it (no dequantisation
area: a slot holds the stored bytes only).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zoedge.runtime.dequantized import Dequantized
from zoedge.memory import allocate
from zoedge.store.manifest import BlockEntry, dtype_of


@dataclass
class Slot:
    """One device buffer (``slot[index]`` in the schedule).

    Its reuse is ordered by the schedule's waits (see :mod:`zoedge.runtime.schedule`), not by the slot.
    """

    index: int
    raw: torch.Tensor
    block: int | None = None
    views: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def make_slot(index: int, raw_bytes: int, device: torch.device) -> Slot:
    return Slot(index, allocate(raw_bytes, device, "slot"))


def _view(buf: torch.Tensor, offset: int, dtype: str, shape: list[int]) -> torch.Tensor:
    dt = dtype_of(dtype)
    n = 1
    for d in shape:
        n *= d
    return buf[offset:offset + n * dt.itemsize].view(dt).view(shape)


def bind(slot: Slot, i: int, block: BlockEntry, chunk_bytes: int) -> dict[str, torch.Tensor]:
    """Tensor name -> view in ``slot`` for block ``i`` (created once, then cached). Quantized tensors are
    :class:`~zoedge.runtime.dequantized.Dequantized` views of their parts, expanded in chunks of at most
    ``chunk_bytes``."""
    if i not in slot.views:
        views = {}
        for t in block.tensors:
            if t.quant == "none":
                p = t.parts["data"]
                views[t.name] = _view(slot.raw, p.offset, p.dtype, t.shape)
            else:
                parts = {k: _view(slot.raw, p.offset, p.dtype, p.shape) for k, p in t.parts.items()}
                views[t.name] = Dequantized(t.quant, parts, t.shape, dtype_of(t.dtype), t.blocksize, chunk_bytes,
                                            t.name)
        slot.views[i] = views
    return slot.views[i]
