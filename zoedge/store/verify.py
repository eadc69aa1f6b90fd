"""Content checks of a block store: every block's sha256, hashed once and then remembered by a stamp.

The manifest records the sha256 of every block file. Before a process first uses a store's bytes,
:func:`verify_blocks` checks each file against it. Hashing a large store on every start would cost a
full read, so a block that hashed right is recorded with its *stamp* ``(st_size, st_mtime_ns, st_ino,
st_ctime_ns)``; later loads re-hash only the blocks whose stamp changed. Any write to a file, a
rename over it or a copy onto it changes its ctime (which, unlike mtime, no user call can set back) or
its inode, so a matching stamp means the bytes that hashed right are still there.

Stamps live in ``STORE/verified.json`` (written atomically), or, for a store this user cannot write,
in ``$ZOEDGE_CACHE/verified/`` and in this process's memory. A stamp whose ctime is within
``RACY_NS`` of the moment hashing began is not trusted (the racy-git rule: a second write in the same
clock tick would leave the stamp unchanged), so such a block is hashed again on the next load.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from zoedge.errors import StoreError
from zoedge.store.atomic import atomic_write_text

VERIFIED_NAME = "verified.json"
RACY_NS = 2_000_000_000  # a stamp younger than this when hashed is hashed again next time
_CHUNK = 1 << 24

Stamp = tuple[int, int, int, int]

#: this process's verified blocks: (resolved path, sha256) -> stamp
_MEMORY: dict[tuple[str, str], Stamp] = {}


def stamp_of(path: Path) -> Stamp:
    """The file's ``(size, mtime_ns, inode, ctime_ns)``."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    """zoedge's cache root (``$ZOEDGE_CACHE``, else the XDG cache; see :func:`zoedge.models.default_cache_root`)."""
    from zoedge.models.default import default_cache_root

    return default_cache_root()


def _stamp_files(store: Path) -> list[Path]:
    """Where this store's stamps may be: in the store, then in the cache (for read-only stores)."""
    key = hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:16]
    return [store / VERIFIED_NAME, cache_root() / "verified" / f"{key}.json"]


def _read_stamps(store: Path) -> dict[str, dict]:
    for path in _stamp_files(store):
        try:
            raw = json.loads(path.read_text())
            blocks = raw["blocks"]
            if raw.get("format") == 1 and isinstance(blocks, dict):
                return blocks
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue  # a missing or damaged stamp file only means hashing again
    return {}


def _write_stamps(store: Path, blocks: dict[str, dict]) -> None:
    text = json.dumps({"format": 1, "blocks": blocks}, indent=0)
    for path in _stamp_files(store):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
            return
        except OSError:
            continue  # read-only store: try the cache; if neither is writable, memory still holds them


def _trusted(stamp: object, now: Stamp) -> bool:
    return isinstance(stamp, (list, tuple)) and tuple(stamp) == now


def verify_blocks(store: Path, blocks: Iterable[tuple[str, str, Path]]) -> int:
    """Check every ``(name, sha256, path)`` block; hash only those without a matching stamp.

    Args:
        store: the store directory (where the stamps are kept).
        blocks: block name, the sha256 the manifest records, and the block file (inside ``store``).

    Returns:
        The number of blocks that were hashed (0 when every stamp matched).

    Raises:
        StoreError: a block's bytes do not hash to the manifest's sha256 (names the file and both hashes).
    """
    stamps = _read_stamps(store)
    root = str(store.resolve())
    fresh: dict[str, dict] = {}
    hashed = 0
    for name, sha, path in blocks:
        rel = path.relative_to(store).as_posix()
        now = stamp_of(path)
        key = (f"{root}/{rel}", sha)
        known = stamps.get(rel)
        if _MEMORY.get(key) == now or (isinstance(known, dict) and known.get("sha256") == sha
                                       and _trusted(known.get("stamp"), now)):
            fresh[rel] = {"sha256": sha, "stamp": list(now)}
            _MEMORY[key] = now
            continue
        started = time.time_ns()
        got = sha256_file(path)
        hashed += 1
        if got != sha:
            raise StoreError(path, f"block {name!r} is corrupt: its sha256 is {got[:16]}..., the manifest records "
                             f"{sha[:16]}... (the file was changed after `zoedge prepare` wrote it)",
                             "re-run `zoedge prepare` into a fresh directory (or delete this store; a cached one "
                             "is rebuilt on the next run)")
        after = stamp_of(path)
        if after != now:
            raise StoreError(path, f"block {name!r} changed while it was being verified",
                             "stop the program writing into the store, then run again")
        if now[3] + RACY_NS < started:  # too recent a change could hide a second one in the same clock tick
            fresh[rel] = {"sha256": sha, "stamp": list(now)}
            _MEMORY[key] = now
    if fresh != stamps:
        _write_stamps(store, fresh)
    return hashed
