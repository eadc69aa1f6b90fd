"""Host tiers: where block bytes live between residencies.

* :class:`RamTier` keeps every block in its own exact-size pinned buffer
  (host RSS ≈ store bytes; no power-of-two rounding). It is also the working
  store of dense methods: write-backs land in these buffers.
* :class:`DiskTier` reads blocks with ``readinto`` into a fixed ring of pinned
  buffers, ahead of use; optionally the first K blocks stay in RAM (with a
  cyclic access pattern a static subset beats an LRU, which would always miss).
  Dense write-backs go to a working copy of the block files, never to the
  prepared store. The working copy is made block by block at each block's
  first write-back (a write-back replaces the whole block), so a run starts
  without copying the store. When the blocks do not fit in the memory the
  system has available, the page cache cannot hold a cycle over them either
  (an LRU always misses on a cyclic pattern larger than itself): the tier then
  drops each block's pages after reading it, and flushes and drops them after
  writing it, so a pass does not push other programs' memory out for nothing.

A tier does not order anything itself: it names the host buffer an upload reads
(``host[i]`` or ``ring[r]``) and the one a write-back lands in (``host[i]`` or
``staging``), and emits its disk reads and writes as ``io`` operations on the
:class:`~zoedge.runtime.schedule.Schedule`; the waits (a ring buffer is refilled
only after the upload out of it completed, a write-back into the staging buffer
waits for the previous disk write, ...) follow from those declared effects.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from zoedge.errors import StoreError
from zoedge.runtime.memory import allocate
from zoedge.runtime.schedule import IO, Schedule
from zoedge.store.manifest import Manifest


def _drop_pages(fd: int) -> None:
    """Drop the file's clean pages from the page cache (a hint; a no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_file_into(path: Path, buf: torch.Tensor, drop_cache: bool = False) -> None:
    """Fill ``buf`` (uint8, exact size) from ``path`` without an intermediate copy; ``drop_cache``: then drop
    the file's pages from the page cache."""
    view = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise StoreError(path, f"file ends after {got} of {len(view)} bytes",
                                 "the store was damaged; re-run `zoedge prepare` into a fresh directory")
            got += n
        if drop_cache:
            _drop_pages(f.fileno())


def write_file_from(path: Path, buf: torch.Tensor, drop_cache: bool = False) -> None:
    """Overwrite ``path`` with ``buf`` (same size) in place, creating it if missing; used for working copies
    only. ``drop_cache``: flush the written pages to the disk and drop them from the page cache."""
    if not path.is_file():  # first write-back of this block: create the working copy's file whole
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb", buffering=0) as f:
            _write_all(f, buf)
        os.replace(tmp, path)
    else:
        with open(path, "r+b", buffering=0) as f:
            _write_all(f, buf)
    if drop_cache:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            _drop_pages(fd)
        finally:
            os.close(fd)


def _write_all(f, buf: torch.Tensor) -> None:
    view = memoryview(buf.numpy())
    done = 0
    while done < len(view):
        done += f.write(view[done:])


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

    @abstractmethod
    def reset_to_base(self) -> None:
        """Make every block's bytes the prepared store's again, dropping trained changes (resume by replaying
        logged updates onto the base, :mod:`zoedge.train.update_log`); call with nothing in flight."""


class RamTier(HostTier):
    """All blocks resident in (pinned, when an accelerator is present) host memory, each at its exact size."""

    def __init__(self, store: Path, manifest: Manifest) -> None:
        super().__init__(store, manifest)
        self.buffers: list[torch.Tensor] = []
        for b in manifest.blocks:
            buf = allocate(b.nbytes, "cpu", "host", pinned=True)
            read_file_into(store / b.file, buf)
            self.buffers.append(buf)
        self.block_buffers = list(self.buffers)  # whole blocks (``buffers`` may become views of units within them)

    def source(self, i: int) -> tuple[str, torch.Tensor]:
        return f"host[{i}]", self.buffers[i]

    def writeback_target(self, i: int) -> tuple[str, torch.Tensor]:
        return f"host[{i}]", self.buffers[i]

    def read_block(self, i: int) -> torch.Tensor:
        return self.buffers[i]

    def write_block(self, i: int, data: torch.Tensor) -> None:
        self.buffers[i].copy_(data)

    def reset_to_base(self) -> None:
        """Read the store into the host buffers again (in place: slots bound to them stay valid)."""
        for b, buf in zip(self.manifest.blocks, self.block_buffers):
            read_file_into(self.store / b.file, buf)


class DiskTier(HostTier):
    """Blocks read on demand into a pinned ring.

    Args:
        store: store directory.
        manifest: its manifest.
        ring: number of pinned staging buffers (≥ prefetch + 1).
        ram_cache_blocks: keep the first K blocks in RAM permanently.
        working_dir: if given, dense updates go to copies of the block files there (dense training on the disk
            tier), each made at its block's first write-back; the prepared store is never written.
        drop_cache: drop block pages from the page cache after each read and write (see the module docstring);
            default: when the blocks exceed the memory available now.
    """

    def __init__(self, store: Path, manifest: Manifest, ring: int = 2, ram_cache_blocks: int = 0,
                 working_dir: Path | None = None, drop_cache: bool | None = None) -> None:
        super().__init__(store, manifest)
        self.store_paths = [store / b.file for b in manifest.blocks]
        self.writable = working_dir is not None
        self.working = self._working_paths(working_dir) if working_dir is not None else None
        if drop_cache is None:
            avail = available_memory()
            drop_cache = avail is not None and sum(b.nbytes for b in manifest.blocks) > avail
        self.drop_cache = drop_cache
        size = max(b.nbytes for b in manifest.blocks)
        self.ring = [allocate(size, "cpu", "pinned", pinned=True) for _ in range(ring)]
        self.cache = {i: allocate(manifest.blocks[i].nbytes, "cpu", "host", pinned=True)
                      for i in range(min(ram_cache_blocks, len(manifest.blocks)))}
        for i, buf in self.cache.items():
            read_file_into(self.path(i), buf)
        self.pending: dict[int, int] = {}  # block -> ring buffer holding (or about to hold) its bytes
        self.next_ring = 0
        self._staging: torch.Tensor | None = None  # D2H target of write-backs, allocated by the first one

    def _working_paths(self, working_dir: Path) -> list[Path]:
        """The working copy's file of each block; one of the wrong size (an earlier run of another store) is
        removed, so that block is read from the store until its first write-back."""
        working_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for b, p in zip(self.manifest.blocks, self.store_paths):
            dst = working_dir / p.name
            dst.with_suffix(".tmp").unlink(missing_ok=True)  # a first write-back that was interrupted
            if dst.is_file() and dst.stat().st_size != b.nbytes:
                dst.unlink()
            out.append(dst)
        return out

    def path(self, i: int) -> Path:
        """Where block ``i``'s current bytes are: its working copy once written back, else the store."""
        if self.working is not None and self.working[i].is_file():
            return self.working[i]
        return self.store_paths[i]

    @property
    def paths(self) -> list[Path]:
        """Every block's current file (see :meth:`path`)."""
        return [self.path(i) for i in range(len(self.store_paths))]

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
        buf, drop = self.ring[r][: self._nbytes(i)], self.drop_cache
        assert self.schedule is not None
        # the file is chosen when the read runs: an earlier write on the same (FIFO) I/O thread may have made the
        # block's working copy
        self.schedule.emit(IO, "read", f"read {self.manifest.blocks[i].name}",
                           lambda: read_file_into(self.path(i), buf, drop),
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
        drop = self.drop_cache

        def write() -> bool:
            if offload.skipped:  # type: ignore[attr-defined]
                return False
            self.check_writable()
            assert self.working is not None
            write_file_from(self.working[i], buf, drop)
            return True

        assert self.schedule is not None
        self.schedule.emit(IO, "write", f"write {self.manifest.blocks[i].name}", write, reads=(name,),
                           writes=(f"file[{i}]",), block=i, nbytes=buf.numel())

    def read_block(self, i: int) -> torch.Tensor:
        buf = torch.empty(self._nbytes(i), dtype=torch.uint8)
        read_file_into(self.path(i), buf, self.drop_cache)
        return buf

    def write_block(self, i: int, data: torch.Tensor) -> None:
        self.check_writable()
        assert self.working is not None
        write_file_from(self.working[i], data, self.drop_cache)
        if i in self.cache:
            self.cache[i].copy_(data)

    def reset_to_base(self) -> None:
        """Remove the working copy's block files (the store is read until each block's next write-back) and
        re-read the RAM-cached blocks from the store."""
        if self.working is not None:
            for w in self.working:
                w.unlink(missing_ok=True)
                w.with_suffix(".tmp").unlink(missing_ok=True)
        for i, buf in self.cache.items():
            read_file_into(self.store_paths[i], buf)
