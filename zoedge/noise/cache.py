"""A noise cache: a step's draws kept in host memory, so that drawing them again is a copy.

Dense ZO methods draw each tensor's noise twice a step on the CPU: z_t for this step's passes, and z_{t-1} again
for the lazy update of the previous step (applied when the block is next resident: see
:mod:`zoedge.optim.base`). Drawing N(0, 1) values costs about as much as the passes' other non-forward work
together (``zoedge bench`` shows it as ``noise``); a copy costs a small fraction of a draw. A
:class:`NoiseCache` keeps the latest draw of each (tensor, stream) in one buffer per tensor, allocated once
(:func:`zoedge.memory.allocate`, purpose ``noise cache``), up to a byte budget: the tensors that fit are
drawn once a step, the others twice, as without a cache. A block's noise workspace borrows those buffers
(:meth:`NoiseCache.lend`, through :meth:`~zoedge.runtime.resident.Resident.noise`): the draw goes straight into
the cache and the update reads it there, so nothing is copied.

The cache never serves stale values: a draw is a pure function of (generator, run seed, step, tensor, stream, kind)
and of its dtype and element count (:mod:`zoedge.noise.source`), and an entry is served only for exactly those. It
changes no result (tests compare runs with and without it bit for bit); only CPU draws of whole tensors go
through it (an accelerator draws fast, and its memory is the scarce one).

The budget is a run setting (``--noise-cache MiB``); its default (:func:`budget`) is a quarter of the memory the
system has available once the model is loaded, on the CPU's RAM tier; nothing on the disk tier (chosen when the
model does not fit in RAM) or on an accelerator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from zoedge.memory import allocate

#: the share of the memory available once the model is loaded that the default budget takes (RAM tier, CPU)
DEFAULT_SHARE = 0.25


def budget(mib: int | None, device: str | torch.device, tier: str, available: int | None) -> int:
    """The budget in bytes: ``mib`` MiB (the ``--noise-cache`` setting) or, when None, the default:
    :data:`DEFAULT_SHARE` of ``available`` bytes on the CPU's RAM tier, else 0."""
    if mib is not None:
        return mib * 2**20
    if torch.device(device).type != "cpu" or tier != "ram" or not available:
        return 0
    return int(available * DEFAULT_SHARE)


class Cached(Protocol):
    """A noise source (:class:`~zoedge.noise.source.NoiseSource`), as far as the cache is concerned."""

    cache: NoiseCache | None


def attach(source: Cached, mib: int | None, device: str | torch.device, tier: str, available: int | None = None,
           local_ranks: int = 1) -> NoiseCache | None:
    """Give ``source`` the cache a run's settings ask for (:func:`budget`, of ``available`` bytes, the memory
    available now, shared among the ``local_ranks`` processes of this machine) and return it; None (and no cache)
    for a zero budget."""
    nbytes = budget(mib, device, tier, (available or 0) // max(1, local_ranks))
    source.cache = NoiseCache(nbytes) if nbytes else None
    return source.cache


@dataclass
class Entry:
    """One kept draw: a flat buffer of the draw's dtype and which draw it holds."""

    buffer: torch.Tensor
    draw: tuple = ()  # (source, step) of the values it holds; (): none (yet, or a draw into it is under way)


@dataclass
class NoiseCache:
    """The latest draw of each (tensor, stream, kind, dtype, size), within ``budget`` bytes (see the module docstring).

    Args:
        budget: bytes the entries may take in all (0: a cache that keeps nothing).
    """

    budget: int
    used: int = 0
    hits: int = 0
    misses: int = 0
    entries: dict[tuple, Entry] = field(default_factory=dict, repr=False)

    def _entry(self, like: torch.Tensor, name: str, stream: str, kind: str, create: bool) -> Entry | None:
        """The entry of (name, stream, kind) for tensors like ``like`` (its dtype and size); ``create``: allocate it
        if it is new and fits the budget."""
        key = name, stream, kind, like.dtype, like.numel()
        entry = self.entries.get(key)
        if entry is None and create:
            nbytes = like.numel() * like.element_size()
            if self.used + nbytes <= self.budget:
                self.used += nbytes
                entry = self.entries[key] = Entry(allocate(nbytes, "cpu", "noise cache").view(like.dtype))
        return entry

    def get(self, out: torch.Tensor, source: tuple, step: int, name: str, stream: str, kind: str) -> bool:
        """Copy the draw (source, step, name, stream, kind) into ``out`` if it is kept; returns whether it was.
        ``source`` identifies the values' source: (generator, run seed) (:attr:`NoiseSource.identity`)."""
        entry = self._entry(out, name, stream, kind, create=False)
        if entry is None or entry.draw != (source, step):
            self.misses += 1
            return False
        out.copy_(entry.buffer.view(out.shape))
        self.hits += 1
        return True

    def put(self, value: torch.Tensor, source: tuple, step: int, name: str, stream: str, kind: str) -> None:
        """Keep a copy of ``value``, the draw (source, step, name, stream, kind), if its entry exists or fits."""
        entry = self._entry(value, name, stream, kind, create=True)
        if entry is not None:
            entry.buffer.view(value.shape).copy_(value)
            entry.draw = (source, step)

    def lend(self, like: torch.Tensor, source: tuple, step: int, name: str, stream: str, kind: str
             ) -> tuple[Entry | None, bool]:
        """The entry of the draw (source, step, name, stream, kind) of a tensor like ``like``, to be read in place
        (no copy): ``(entry, True)`` when it holds the draw; ``(entry, False)`` when it holds another (or none):
        the caller draws into ``entry.buffer`` and then sets ``entry.draw = (source, step)``; ``(None, False)``
        when the draw does not fit the budget. The buffer is the cache's own: whoever borrows it must not write
        anything else into it."""
        entry = self._entry(like, name, stream, kind, create=True)
        held = entry is not None and entry.draw == (source, step)
        if held:
            self.hits += 1
        else:
            self.misses += 1
            if entry is not None:
                entry.draw = ()  # until the caller has drawn into it
        return entry, held

    def to_dict(self) -> dict[str, int]:
        """Budget, bytes held and hit / miss counts (for run summaries)."""
        return {"budget_bytes": self.budget, "bytes": self.used, "hits": self.hits, "misses": self.misses}
