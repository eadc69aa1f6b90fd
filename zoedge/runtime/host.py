"""Host tiers: where block bytes live between residencies.

* :class:`RamTier` keeps every block in its own exact-size pinned buffer
  (host RSS ≈ store bytes; no power-of-two rounding). It is also the working
  store of dense methods: write-backs land in these buffers.
* :class:`DiskTier` reads blocks with ``readinto`` into a fixed ring of pinned
  buffers, ahead of use; optionally the first K blocks stay in RAM (with a
  cyclic access pattern a static subset beats an LRU, which would always miss),
  and so do the blocks named ``resident`` (the CPU's in-place binding keeps a
  tied weight's owner there: the head reads it after the ring has moved on).
  Dense write-backs go to a working copy of the block files, never to the
  prepared store. The working copy is made block by block at each block's
  first write-back (a write-back replaces the whole block), so a run starts
  without copying the store. When the blocks do not fit in the memory the
  system has available, the page cache cannot hold a cycle over them either
  (an LRU always misses on a cyclic pattern larger than itself): the tier then
  drops each block's pages after reading it, and flushes and drops them after
  writing it, so a pass does not push other programs' memory out for nothing.
  By default it then reads and writes with ``O_DIRECT`` instead (``direct_io``):
  the bytes move between the disk and the (page-aligned) ring buffer without
  the page cache's copy, flush and drop, which cost the I/O thread CPU time the
  forward passes need. ``O_DIRECT`` moves whole 4 KiB units at aligned offsets:
  a block's tail after its last whole unit goes buffered (one page at most stays
  cached). A filesystem that refuses ``O_DIRECT`` (tmpfs before Linux 6.6) is
  asked once and then served buffered; ``DiskTier.io_mode`` says which is used.
  When the blocks fit, reads stay buffered: the page cache serves the next pass.

A tier does not order anything itself: it names the host buffer an upload reads
(``host[i]`` or ``ring[r]``) and the one a write-back lands in (``host[i]`` or
``staging``), and emits its disk reads and writes as ``io`` operations on the
:class:`~zoedge.runtime.schedule.Schedule`; the waits (a ring buffer is refilled
only after the upload out of it completed, a write-back into the staging buffer
waits for the previous disk write, ...) follow from those declared effects.

On the CPU the device is the host, and the streamed model binds each block in
place in the buffer :meth:`HostTier.source` names (see
:mod:`zoedge.runtime.run_loop`): with the disk tier, compute reads and updates
the ring buffer the block was read into, the disk write persists that same
buffer, and the ring buffer is read into again only after both (the read's
write-after-read waits on the compute and, on the FIFO I/O queue, follows the
write). No slot and no staging buffer exist then.

Durability: the working copy is a run's scratch state, not its crash-safety
mechanism (checkpoints are, :mod:`zoedge.train.checkpoint`: a resume restores
every weight from the last checkpoint). A disk write therefore does not sync
for durability; a buffered write with ``drop_cache`` flushes the block's pages
only so that they can be dropped from the page cache (a direct write leaves none
but the tail's).
"""
from __future__ import annotations

import errno
import fcntl
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from zoedge.errors import StoreError
from zoedge.memory import allocate, page_aligned
from zoedge.runtime.schedule import IO, Schedule
from zoedge.store.manifest import Manifest


ALIGN = 4096
"""``O_DIRECT``'s unit: buffer address, file offset and length a multiple of it (every common logical block size
divides it)."""
O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none: every transfer is buffered
_refused: set[int] = set()  # devices (``st_dev``) whose filesystem refused O_DIRECT: asked once, remembered


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


def _filesystem(path: Path) -> int:
    return os.stat(path.parent).st_dev


def direct_io_accepted(path: Path) -> bool:
    """False once the filesystem holding ``path`` refused ``O_DIRECT`` (or the platform has none)."""
    return bool(O_DIRECT) and _filesystem(path) not in _refused


def probe_direct_io(path: Path) -> bool:
    """Whether the filesystem holding ``path`` takes ``O_DIRECT``: opens ``path`` (an existing file, read-only) or
    creates and removes it; a refusal (tmpfs before Linux 6.6: ``EINVAL``) is remembered for that filesystem."""
    if not direct_io_accepted(path):
        return False
    existing = path.is_file()
    fd, direct = _open(path, os.O_RDONLY if existing else os.O_WRONLY | os.O_CREAT | os.O_TRUNC, True)
    os.close(fd)
    if not existing:
        path.unlink()
    return direct


def _open(path: Path, flags: int, direct: bool) -> tuple[int, bool]:
    """Open ``path`` with ``O_DIRECT`` when ``direct`` and its filesystem takes it, else buffered: (fd, direct)."""
    if direct and direct_io_accepted(path):
        try:
            return os.open(path, flags | O_DIRECT, 0o666), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            _refused.add(_filesystem(path))
    return os.open(path, flags, 0o666), False


def _transfer(path: Path, fd: int, view: memoryview, direct: bool, op: Callable[[int, memoryview, int], int]) -> int:
    """Move ``view`` to or from the file's start with ``op(fd, chunk, offset) -> bytes moved`` (0: end of file);
    returns the bytes moved. ``direct`` (an O_DIRECT fd, ``view`` page-aligned): the page-aligned prefix moves
    directly, the rest (the short tail, or all after a short or refused transfer) buffered."""
    n, done = len(view), 0
    end = n - n % ALIGN
    while done < n:
        if direct and (done >= end or done % ALIGN):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
            direct = False
        try:
            k = op(fd, view[done:end if direct else n], done)
        except OSError as e:  # a filesystem that opens O_DIRECT files but refuses their transfers
            if not (direct and e.errno == errno.EINVAL):
                raise
            _refused.add(_filesystem(path))
            end = done
            continue
        if not k:
            break
        done += k
    return done


def _direct_ok(buf: torch.Tensor) -> bool:
    """O_DIRECT applies: the buffer starts on a page boundary and holds at least one whole unit."""
    return buf.data_ptr() % ALIGN == 0 and buf.numel() >= ALIGN


def read_file_into(path: Path, buf: torch.Tensor, drop_cache: bool = False, direct: bool = False) -> None:
    """Fill ``buf`` (uint8, exact size) from ``path`` without an intermediate copy.

    ``direct``: read with ``O_DIRECT``, past the page cache, where the filesystem and the buffer's address allow
    (the tail after the last whole 4 KiB is read buffered). ``drop_cache``: after a buffered read, drop the file's
    pages from the page cache."""
    view = memoryview(buf.numpy())
    fd, direct = _open(path, os.O_RDONLY, direct and _direct_ok(buf))
    try:
        got = _transfer(path, fd, view, direct, lambda fd, chunk, at: os.preadv(fd, [chunk], at))
        if got < len(view):
            raise StoreError(path, f"file ends after {got} of {len(view)} bytes",
                             "the store was damaged; re-run `zoedge prepare` into a fresh directory")
        if drop_cache and not direct:
            _drop_pages(fd)
    finally:
        os.close(fd)


def write_file_from(path: Path, buf: torch.Tensor, drop_cache: bool = False, direct: bool = False) -> None:
    """Overwrite ``path`` with ``buf`` (same size) in place; used for working copies only. A missing file is
    created whole under a temporary name and renamed (an interrupted first write leaves no partial file).

    ``direct``: as in :func:`read_file_into`. ``drop_cache``: after a buffered write, flush the written pages to
    the disk and drop them from the page cache."""
    if path.is_file():
        _write(path, os.O_WRONLY, buf, drop_cache, direct)
        return
    tmp = path.with_suffix(".tmp")
    try:
        _write(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, buf, drop_cache, direct)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write(path: Path, flags: int, buf: torch.Tensor, drop_cache: bool, direct: bool) -> None:
    view = memoryview(buf.numpy())
    fd, direct = _open(path, flags, direct and _direct_ok(buf))
    try:
        if _transfer(path, fd, view, direct, os.pwrite) < len(view):
            raise OSError(errno.EIO, f"short write of {len(view)} bytes", str(path))
        if drop_cache and not direct:
            os.fdatasync(fd)
            _drop_pages(fd)
    finally:
        os.close(fd)


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

    def named_buffers(self) -> dict[str, torch.Tensor]:
        """Every host buffer :meth:`source` may name, whole (the CPU binds blocks in them in place)."""
        return {}

    def persist(self, i: int, buffer: tuple[str, torch.Tensor], changed: Callable[[], bool]) -> None:
        """Block ``i``'s updated bytes are in ``buffer`` (name, tensor) once the operations emitted so far have run:
        emit what persists them (disk tier: a disk write), skipped when ``changed()`` is False when it runs."""

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

    def named_buffers(self) -> dict[str, torch.Tensor]:
        return {f"host[{i}]": buf for i, buf in enumerate(self.buffers)}

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
        resident: further blocks kept in RAM permanently (the CPU's in-place binding: tied weights' owners).
        working_dir: if given, dense updates go to copies of the block files there (dense training on the disk
            tier), each made at its block's first write-back; the prepared store is never written.
        drop_cache: drop block pages from the page cache after each read and write (see the module docstring);
            default: when the blocks exceed the memory available now.
        direct_io: read and write blocks with ``O_DIRECT``, past the page cache (see the module docstring);
            default: when ``drop_cache``. :attr:`io_mode` says what is used.
    """

    def __init__(self, store: Path, manifest: Manifest, ring: int = 2, ram_cache_blocks: int = 0,
                 working_dir: Path | None = None, drop_cache: bool | None = None,
                 resident: Iterable[int] = (), direct_io: bool | None = None) -> None:
        super().__init__(store, manifest)
        self.store_paths = [store / b.file for b in manifest.blocks]
        self.writable = working_dir is not None
        self.working = self._working_paths(working_dir) if working_dir is not None else None
        if drop_cache is None:
            avail = available_memory()
            drop_cache = avail is not None and sum(b.nbytes for b in manifest.blocks) > avail
        self.drop_cache = drop_cache
        self.direct_io = direct_io
        # ask the filesystems now (once each), so that io_mode is known before the first transfer
        probes = self.store_paths[:1]
        if working_dir is not None:
            probes.append(working_dir / ".direct-io-probe")
            probes[-1].unlink(missing_ok=True)  # left by a process killed while probing
        for probe in probes:
            probe_direct_io(probe)
        kept = sorted(set(range(min(ram_cache_blocks, len(manifest.blocks)))) | set(resident))
        streamed = [b.nbytes for i, b in enumerate(manifest.blocks) if i not in kept]
        size = max(streamed, default=0)  # the ring holds only the blocks not kept in RAM
        self.ring = [allocate(size, "cpu", "pinned", pinned=True, aligned=True)
                     for _ in range(ring)] if streamed else []
        self.cache = {i: allocate(manifest.blocks[i].nbytes, "cpu", "host", pinned=True, aligned=True) for i in kept}
        for i, buf in self.cache.items():
            read_file_into(self.path(i), buf)
        self.pending: dict[int, int] = {}  # block -> ring buffer holding (or about to hold) its bytes
        self.next_ring = 0
        self._staging: torch.Tensor | None = None  # D2H target of write-backs, allocated by the first one

    @property
    def io_mode(self) -> str:
        """How blocks move between the disk and the host buffers: ``"direct"`` (``O_DIRECT``) when asked for
        (``direct_io``, by default ``drop_cache``) and the store's and the working copy's filesystems take it,
        else ``"buffered"``."""
        want = self.drop_cache if self.direct_io is None else self.direct_io
        files = self.store_paths[:1] + (self.working[:1] if self.working is not None else [])
        return "direct" if want and all(direct_io_accepted(p) for p in files) else "buffered"

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
            raise RuntimeError(f"disk tier: ring buffer {r} refilled before its block was used "
                               "(read ahead further than the ring holds)")
        self.next_ring = (r + 1) % len(self.ring)
        self.pending[i] = r
        buf, drop, direct = self.ring[r][: self._nbytes(i)], self.drop_cache, self.io_mode == "direct"
        assert self.schedule is not None
        # the file is chosen when the read runs: an earlier write on the same (FIFO) I/O thread may have made the
        # block's working copy
        self.schedule.emit(IO, "read", f"read {self.manifest.blocks[i].name}",
                           lambda: read_file_into(self.path(i), buf, drop, direct),
                           reads=(f"file[{i}]",), writes=(f"ring[{r}]",), block=i, nbytes=buf.numel())

    def source(self, i: int) -> tuple[str, torch.Tensor]:
        if i in self.cache:
            return f"host[{i}]", self.cache[i]
        self.read_ahead(i)
        r = self.pending.pop(i)
        return f"ring[{r}]", self.ring[r][: self._nbytes(i)]

    def named_buffers(self) -> dict[str, torch.Tensor]:
        return {**{f"ring[{r}]": buf for r, buf in enumerate(self.ring)},
                **{f"host[{i}]": buf for i, buf in self.cache.items()}}

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
                                     pinned=True, aligned=True)
        return self._staging

    def persist(self, i: int, buffer: tuple[str, torch.Tensor], changed: Callable[[], bool]) -> None:
        name, buf = buffer
        drop, direct = self.drop_cache, self.io_mode == "direct"

        def write() -> bool:
            if not changed():
                return False
            self.check_writable()
            assert self.working is not None
            write_file_from(self.working[i], buf, drop, direct)
            return True

        assert self.schedule is not None
        self.schedule.emit(IO, "write", f"write {self.manifest.blocks[i].name}", write, reads=(name,),
                           writes=(f"file[{i}]",), block=i, nbytes=buf.numel())

    def read_block(self, i: int) -> torch.Tensor:
        direct = self.io_mode == "direct"
        buf = page_aligned(self._nbytes(i)) if direct else torch.empty(self._nbytes(i), dtype=torch.uint8)
        read_file_into(self.path(i), buf, self.drop_cache, direct)
        return buf

    def write_block(self, i: int, data: torch.Tensor) -> None:
        self.check_writable()
        assert self.working is not None
        write_file_from(self.working[i], data, self.drop_cache, self.io_mode == "direct")
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
