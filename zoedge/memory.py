"""Every long-lived buffer of the runtime is allocated here, once, and counted.

The runtime promises that nothing is allocated per step: slots, the pinned
ring, dequantization and plugin workspaces are all created on first use and
then reused. :data:`ALLOCATIONS` lets tests (and ``zoedge bench``) check that
the counts stay flat after the first forward.
"""
from __future__ import annotations

import mmap
from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class AllocationLog:
    """Counts and bytes of runtime allocations by purpose (``slot``, ``pinned``, ``host``, ``workspace`` ...)."""

    count: Counter = field(default_factory=Counter)
    nbytes: Counter = field(default_factory=Counter)

    def total(self) -> int:
        return sum(self.count.values())

    def snapshot(self) -> dict[str, int]:
        return dict(self.count)


ALLOCATIONS = AllocationLog()


def can_pin() -> bool:
    """Pinned (page-locked) host memory needs an accelerator: ``pin_memory=True`` raises without one."""
    return torch.accelerator.is_available()


def page_aligned(nbytes: int) -> torch.Tensor:
    """A flat uint8 host buffer of exactly ``nbytes`` starting on a page boundary (``O_DIRECT`` transfers need an
    aligned address; torch's allocator aligns to 64 bytes only): private anonymous memory, as the C allocator
    itself maps a large buffer, freed with the tensor. Not counted: :func:`allocate` counts long-lived ones."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=torch.uint8)


def allocate(nbytes: int, device: torch.device | str, purpose: str, pinned: bool = False,
             aligned: bool = False) -> torch.Tensor:
    """Allocate a flat uint8 buffer and count it.

    Args:
        nbytes: exact size (no rounding: host RSS stays within a few % of the store size).
        device: target device.
        purpose: label for :data:`ALLOCATIONS`.
        pinned: page-locked host memory (ignored, with ordinary memory used instead, when no accelerator is present).
        aligned: a host buffer starting on a page boundary (:func:`page_aligned`), for direct disk I/O. Pinned
            memory comes from the accelerator's host allocator (page-aligned in practice; a reader checks).
    """
    device = torch.device(device)
    pin = pinned and device.type == "cpu" and can_pin()
    if aligned and device.type == "cpu" and not pin:
        buf = page_aligned(nbytes)
    else:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
    ALLOCATIONS.count[purpose] += 1
    ALLOCATIONS.nbytes[purpose] += nbytes
    return buf
