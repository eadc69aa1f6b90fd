"""Host tiers: where block bytes live between residencies.

* :class:`RamTier` keeps every block in its own exact-size pinned buffer
  (host RSS ≈ store bytes; no power-of-two rounding). It is also the working
  store of dense methods: write-backs land in these buffers.
* :class:`DiskTier` reads blocks with ``readinto`` on one I/O thread into a
  fixed ring of pinned buffers, ahead of use; optionally the first K blocks stay
  in RAM (with a cyclic access pattern a static subset beats an LRU, which would
  always miss). Dense write-backs go to a working copy of the block files,
  never to the prepared store.

Both hand the scheduler a uint8 host tensor per block. A buffer is reused only
after the device copy that reads it has completed: the scheduler passes the
copy's CUDA event to :meth:`HostTier.release` (``None`` on CPU, where copies are
synchronous).
"""
from __future__ import annotations

import os
import shutil
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from zoedge.errors import StoreError
from zoedge.runtime.memory import allocate
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
    """Interface the scheduler uses. Blocks are indexed in manifest order."""

    def __init__(self, store: Path, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest

    def schedule(self, i: int) -> None:
        """Hint: block ``i`` will be fetched soon (start reading it)."""

    @abstractmethod
    def fetch(self, i: int) -> torch.Tensor:
        """Host buffer holding block ``i``'s bytes (waits for a pending read)."""

    def release(self, i: int, event: torch.cuda.Event | None) -> None:
        """The device copy out of ``fetch(i)``'s buffer is enqueued; reuse after ``event``."""

    @abstractmethod
    def writeback_target(self, i: int) -> torch.Tensor:
        """Host buffer a dense update of block ``i`` is copied into (device → host)."""

    def commit_writeback(self, i: int, event: torch.cuda.Event | None) -> None:
        """The copy into ``writeback_target(i)`` is enqueued; persist it once ``event`` completes."""

    def close(self) -> None:
        """Finish pending I/O."""


class RamTier(HostTier):
    """All blocks resident in (pinned, when CUDA is present) host memory, each at its exact size."""

    def __init__(self, store: Path, manifest: Manifest) -> None:
        super().__init__(store, manifest)
        self.buffers: list[torch.Tensor] = []
        for b in manifest.blocks:
            buf = allocate(b.nbytes, "cpu", "host", pinned=True)
            read_file_into(store / b.file, buf)
            self.buffers.append(buf)

    def fetch(self, i: int) -> torch.Tensor:
        return self.buffers[i]

    def writeback_target(self, i: int) -> torch.Tensor:
        return self.buffers[i]


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
        self.ring_free: list[torch.cuda.Event | None] = [None] * ring
        self.cache = {i: allocate(manifest.blocks[i].nbytes, "cpu", "host", pinned=True)
                      for i in range(min(ram_cache_blocks, len(manifest.blocks)))}
        for i, buf in self.cache.items():
            read_file_into(self.paths[i], buf)
        self.io = ThreadPoolExecutor(1, thread_name_prefix="zoedge-io")  # one thread: FIFO orders writes before re-reads
        self.pending: dict[int, Future] = {}
        self.next_ring = 0
        self.ring_of: dict[int, int] = {}
        self.staging = allocate(size, "cpu", "pinned", pinned=True)  # D2H target of write-backs
        self.write_done: Future | None = None
        self.lock = threading.Lock()

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

    def _read(self, i: int, r: int) -> torch.Tensor:
        ev = self.ring_free[r]
        if ev is not None:
            ev.synchronize()  # the previous H2D out of this ring buffer must finish first (I/O thread, not hot loop)
        buf = self.ring[r][: self.manifest.blocks[i].nbytes]
        read_file_into(self.paths[i], buf)
        return buf

    def schedule(self, i: int) -> None:
        if i in self.cache or i in self.pending:
            return
        r = self.next_ring
        self.next_ring = (r + 1) % len(self.ring)
        self.ring_of[i] = r
        self.pending[i] = self.io.submit(self._read, i, r)

    def fetch(self, i: int) -> torch.Tensor:
        if i in self.cache:
            return self.cache[i]
        self.schedule(i)
        return self.pending[i].result()

    def release(self, i: int, event: torch.cuda.Event | None) -> None:
        if i in self.pending:
            self.ring_free[self.ring_of.pop(i)] = event
            del self.pending[i]

    def check_writable(self) -> None:
        """The prepared store is read-only: writes need a working copy."""
        if not self.writable:
            raise StoreError(self.store, "a dense update would write into the prepared store (disk tier without "
                             "a working copy)", "pass working_dir=... to zoedge.load (the CLI uses OUTPUT/working)")

    def writeback_target(self, i: int) -> torch.Tensor:
        self.check_writable()
        if i in self.cache:
            return self.cache[i]
        if self.write_done is not None:
            self.write_done.result()  # one staging buffer: the previous write must be on disk first
        return self.staging[: self.manifest.blocks[i].nbytes]

    def commit_writeback(self, i: int, event: torch.cuda.Event | None) -> None:
        def _write() -> None:
            if event is not None:
                event.synchronize()
            buf = self.cache[i] if i in self.cache else self.staging[: self.manifest.blocks[i].nbytes]
            write_file_from(self.paths[i], buf)
        self.write_done = self.io.submit(_write)

    def close(self) -> None:
        if self.write_done is not None:
            self.write_done.result()
        self.io.shutdown(wait=True)
