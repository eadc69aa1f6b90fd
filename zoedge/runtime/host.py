"""Host tiers: where block bytes live between residencies.

* :class:`RamTier` keeps every block in its own exact-size pinned buffer
  (host RSS ≈ store bytes; no power-of-two rounding). It is also the working
  store of dense methods: write-backs land in these buffers.
* :class:`DiskTier` reads blocks with ``readinto`` into a fixed ring of pinned
  buffers, ahead of use; optionally the first K blocks stay in RAM (with a
  cyclic access pattern a static subset beats an LRU, which would always miss).
  Dense write-backs go to a working copy of the block files, never to the
  prepared store.

A tier does not order anything itself: it names the host buffer an upload reads
(``host[i]`` or ``ring[r]``) and the one a write-back lands in (``host[i]`` or
``staging``), and emits its disk reads and writes as ``io`` operations on the
:class:`~zoedge.runtime.schedule.Schedule`; the waits (a ring buffer is refilled
only after the upload out of it completed, a write-back into the staging buffer
waits for the previous disk write, ...) follow from those declared effects.
"""
from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from zoedge.errors import StoreError
from zoedge.runtime.memory import allocate
from zoedge.runtime.schedule import IO, Schedule
from zoedge.store.manifest import Manifest


def read_file_into(path: Path, buf: torch.Tensor) -> None:
    """Fill ``buf`` (uint8, exact size) from ``path`` without an intermediate copy."""
    view = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise StoreError(path, f"file ends after {got} of {len(view)} bytes",
                                 "the store was damaged; re-run `zoedge prepare` into a fresh directory")
            got += n


def write_file_from(path: Path, buf: torch.Tensor) -> None:
    """Overwrite ``path`` with ``buf`` (same size) in place; used for working copies only."""
    with open(path, "r+b", buffering=0) as f:
        f.write(memoryview(buf.numpy()))


class HostTier(ABC):
    """Interface the streamed model uses. Blocks are indexed in manifest order."""

    def __init__(self, store: Path, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest
        self.schedule: Schedule | None = None

    def attach(self, schedule: Schedule) -> None:
        """The schedule the tier emits its disk operations on."""
        self.schedule = schedule

    def read_ahead(self, i: int) -> None:
        """Block ``i`` will be uploaded soon: start reading it (disk tier)."""

    @abstractmethod
    def source(self, i: int) -> tuple[str, torch.Tensor]:
        """(buffer name, host tensor) an upload of block ``i`` copies from; call once per upload."""

    @abstractmethod
    def writeback_target(self, i: int) -> tuple[str, torch.Tensor]:
        """(buffer name, host tensor) a dense update of block ``i`` is copied into (device → host)."""

    def check_writable(self) -> None:
        """Raise if dense updates cannot be stored (called before the first byte is written back)."""

    def after_writeback(self, i: int, offload: object) -> None:
        """The write-back ``offload`` of block ``i`` is emitted: emit what persists it (disk tier)."""

    @abstractmethod
    def read_block(self, i: int) -> torch.Tensor:
        """Block ``i``'s current bytes (after the engine synchronised): a tensor the caller may keep."""

    @abstractmethod
    def write_block(self, i: int, data: torch.Tensor) -> None:
        """Replace block ``i``'s bytes in the working copy (after the engine synchronised)."""

    def close(self) -> None:
        """Release resources."""


class RamTier(HostTier):
    """All blocks resident in (pinned, when an accelerator is present) host memory, each at its exact size."""

    def __init__(self, store: Path, manifest: Manifest) -> None:
        super().__init__(store, manifest)
        self.buffers: list[torch.Tensor] = []
        for b in manifest.blocks:
            buf = allocate(b.nbytes, "cpu", "host", pinned=True)
            read_file_into(store / b.file, buf)
            self.buffers.append(buf)

    def source(self, i: int) -> tuple[str, torch.Tensor]:
        return f"host[{i}]", self.buffers[i]

    def writeback_target(self, i: int) -> tuple[str, torch.Tensor]:
        return f"host[{i}]", self.buffers[i]

    def read_block(self, i: int) -> torch.Tensor:
        return self.buffers[i]

    def write_block(self, i: int, data: torch.Tensor) -> None:
        self.buffers[i].copy_(data)


class DiskTier(HostTier):
    """Blocks read on demand into a pinned ring.

    Args:
        store: store directory.
        manifest: its manifest.
        ring: number of pinned staging buffers (≥ prefetch + 1).
        ram_cache_blocks: keep the first K blocks in RAM permanently.
        working_dir: if given, block files are copied there once and reads/writes use the copies (dense training
            on the disk tier); the prepared store is never written.
    """

    def __init__(self, store: Path, manifest: Manifest, ring: int = 2, ram_cache_blocks: int = 0,
                 working_dir: Path | None = None) -> None:
        super().__init__(store, manifest)
        self.paths = [store / b.file for b in manifest.blocks]
        self.writable = working_dir is not None
        if working_dir is not None:
            self.paths = self._working_copy(working_dir)
        size = max(b.nbytes for b in manifest.blocks)
        self.ring = [allocate(size, "cpu", "pinned", pinned=True) for _ in range(ring)]
        self.cache = {i: allocate(manifest.blocks[i].nbytes, "cpu", "host", pinned=True)
                      for i in range(min(ram_cache_blocks, len(manifest.blocks)))}
        for i, buf in self.cache.items():
            read_file_into(self.paths[i], buf)
        self.pending: dict[int, int] = {}  # block -> ring buffer holding (or about to hold) its bytes
        self.next_ring = 0
        self._staging: torch.Tensor | None = None  # D2H target of write-backs, allocated by the first one

    def _working_copy(self, working_dir: Path) -> list[Path]:
        working_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for p in self.paths:
            dst = working_dir / p.name
            if not dst.is_file() or dst.stat().st_size != p.stat().st_size:
                shutil.copyfile(p, dst.with_suffix(".tmp"))
                os.replace(dst.with_suffix(".tmp"), dst)
            out.append(dst)
        return out

    def _nbytes(self, i: int) -> int:
        return self.manifest.blocks[i].nbytes

    def read_ahead(self, i: int) -> None:
        if i in self.cache or i in self.pending:
            return
        r = self.next_ring
        if r in self.pending.values():
            raise RuntimeError(f"disk tier: ring buffer {r} refilled before its block was uploaded "
                               "(read ahead further than the ring holds)")
        self.next_ring = (r + 1) % len(self.ring)
        self.pending[i] = r
        buf, path = self.ring[r][: self._nbytes(i)], self.paths[i]
        assert self.schedule is not None
        self.schedule.emit(IO, "read", f"read {self.manifest.blocks[i].name}", lambda: read_file_into(path, buf),
                           reads=(f"file[{i}]",), writes=(f"ring[{r}]",), block=i, nbytes=buf.numel())

    def source(self, i: int) -> tuple[str, torch.Tensor]:
        if i in self.cache:
            return f"host[{i}]", self.cache[i]
        self.read_ahead(i)
        r = self.pending.pop(i)
        return f"ring[{r}]", self.ring[r][: self._nbytes(i)]

    def check_writable(self) -> None:
        """The prepared store is read-only: writes need a working copy."""
        if not self.writable:
            raise StoreError(self.store, "a dense update would write into the prepared store (disk tier without "
                             "a working copy)", "pass working_dir=... to zoedge.load (the CLI uses OUTPUT/working)")

    def writeback_target(self, i: int) -> tuple[str, torch.Tensor]:
        if i in self.cache:
            return f"host[{i}]", self.cache[i]
        return "staging", self.staging[: self._nbytes(i)]

    @property
    def staging(self) -> torch.Tensor:
        """The write-back staging buffer (sized to the largest block), allocated when a pass that may write back is
        first emitted: a read-only run (forward, eval) never holds it."""
        if self._staging is None:
            self._staging = allocate(max(self._nbytes(i) for i in range(len(self.paths))), "cpu", "pinned",
                                     pinned=True)
        return self._staging

    def after_writeback(self, i: int, offload: object) -> None:
        name, buf = self.writeback_target(i)
        path = self.paths[i]

        def write() -> bool:
            if offload.skipped:  # type: ignore[attr-defined]
                return False
            write_file_from(path, buf)
            return True

        assert self.schedule is not None
        self.schedule.emit(IO, "write", f"write {self.manifest.blocks[i].name}", write, reads=(name,),
                           writes=(f"file[{i}]",), block=i, nbytes=buf.numel())

    def read_block(self, i: int) -> torch.Tensor:
        buf = torch.empty(self._nbytes(i), dtype=torch.uint8)
        read_file_into(self.paths[i], buf)
        return buf

    def write_block(self, i: int, data: torch.Tensor) -> None:
        self.check_writable()
        write_file_from(self.paths[i], data)
        if i in self.cache:
            self.cache[i].copy_(data)
