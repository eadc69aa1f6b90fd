"""Block stores prepared automatically from ``--model DIR`` (a Hugging Face checkpoint), kept in the cache.

``$ZOEDGE_CACHE/stores/<dir name>-<dtype>-<quant>-<key>/`` (``key``: a hash of the resolved path, dtype and
quant) is an ordinary store plus two files:

* ``source.json``: what it was made from -- for every weight, index, config and tokenizer file in DIR its
  size, mtime, inode, ctime and sha256. Before the store is used, a file whose stamp (size, mtime, inode,
  ctime) differs is hashed again; a different hash, or a file added or removed, rebuilds the store.
  Content is compared, so a checkpoint re-saved in place is detected even with the same size and a
  restored mtime; ctime, which no user call can set back, changes on every write or rename.
* ``last-used``: touched on every use (its mtime is the "last used" of ``zoedge cache list``).
* ``.leases/``: one per process using the store (:mod:`zoedge.store.lease`); a store with a live lease is
  neither pruned nor rebuilt (a rebuild is refused, naming the process, until that process ends).

A store is built in ``<store>.partial`` (its source record in ``<store>.partial.json``; resumed after an
interruption only if the source's contents are unchanged) and renamed into place when complete, under a lock
file, so a concurrent run never sees half a store.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from zoedge.errors import ConfigError, StoreError
from zoedge.store.lease import StoreLease, in_use
from zoedge.store.manifest import MANIFEST_NAME
from zoedge.store.verify import RACY_NS, atomic_write_text, cache_root, sha256_file, stamp_of

SOURCE_NAME = "source.json"
LAST_USED = "last-used"
SOURCE_GLOBS = ("*.safetensors", "model.safetensors.index.json")


def stores_dir() -> Path:
    """Where prepared stores of ``--model DIR`` live: ``$ZOEDGE_CACHE/stores`` (default ``~/.cache/zoedge``)."""
    return cache_root() / "stores"


def _source_files(src: Path) -> list[Path]:
    from zoedge.store.prepare import SIDE_FILES

    files = {p for pattern in SOURCE_GLOBS for p in src.glob(pattern) if p.is_file()}
    files |= {src / n for n in SIDE_FILES if (src / n).is_file()}
    return sorted(files)


def _file_record(path: Path, sha: str | None = None) -> dict:
    """A file's stamp and sha256; the stamp is null when too recent to trust (hashed again next time)."""
    started = time.time_ns()
    stamp = stamp_of(path)
    return {"stamp": list(stamp) if stamp[3] + RACY_NS < started else None,
            "sha256": sha256_file(path) if sha is None else sha}


def record_source(src: Path) -> dict:
    """Size, mtime, inode, ctime and sha256 of every file a store is made from (stamps taken before hashing)."""
    return {"format": 1, "source": str(src.resolve()), "files": {p.name: _file_record(p) for p in _source_files(src)}}


def source_change(src: Path, record: dict) -> str | None:
    """Why ``src`` no longer matches ``record`` (None when it does). Files with unchanged stamps are not
    hashed; files that hash the same under a new stamp get the new stamp in ``record`` (the caller saves it)."""
    try:
        files = record["files"]
        names = {p.name: p for p in _source_files(src)}
        if set(names) != set(files):
            added, gone = sorted(set(names) - set(files)), sorted(set(files) - set(names))
            return f"files added {added} / removed {gone}"
        for name, path in names.items():
            old = files[name]
            if old["stamp"] is not None and tuple(old["stamp"]) == stamp_of(path):
                continue
            fresh = _file_record(path)
            if fresh["sha256"] != old["sha256"]:
                return f"{name} has other contents"
            files[name] = fresh
    except (OSError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable record ({e})"
    return None


@contextmanager
def _locked(store: Path) -> Iterator[None]:
    """An exclusive lock for building or deleting ``store`` (a ``.lock`` file next to it)."""
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_name(store.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    """Delete a store directory: renamed aside first, so no one sees it half deleted."""
    if path.exists():
        aside = path.with_name(f"{path.name}.deleting-{os.getpid()}")
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)


def prepared_store(src: Path, dtype: str = "fp32", quant: str = "none", progress: bool = True,
                   log: Callable[[str], None] = print, lease: ExitStack | None = None) -> Path:
    """The cached store of checkpoint ``src``, built (or rebuilt, when ``src`` changed) as needed.

    Args:
        lease: when given, a :class:`~zoedge.store.lease.StoreLease` on the store is taken (under the build lock,
            so the store cannot go between its check and the lease) and entered into it.

    Raises:
        ConfigError, CheckpointError, StoreError: as :func:`zoedge.prepare`; StoreError also when ``src``
            changed but the store is in use by another process (it is not rebuilt under that process).
    """
    from zoedge.store.manifest import unfinished_store_error
    from zoedge.store.prepare import prepare, resumable

    if (src / "blocks").is_dir() and not (src / "config.json").is_file():
        raise unfinished_store_error(src)
    require_tokenizer(src)
    key = hashlib.sha256(f"{src.resolve()}|{dtype}|{quant}".encode()).hexdigest()[:12]
    store = stores_dir() / f"{src.resolve().name}-{dtype}-{quant}-{key}"
    with _locked(store):
        if (store / MANIFEST_NAME).is_file():
            try:
                text = (store / SOURCE_NAME).read_text()
                record = json.loads(text)
                change = source_change(src, record)
            except (OSError, ValueError) as e:
                change = f"no record of the source ({type(e).__name__})"
            if change is None:
                if json.dumps(record, indent=1) != text:  # new stamps of files that hashed the same
                    atomic_write_text(store / SOURCE_NAME, json.dumps(record, indent=1))
                (store / LAST_USED).touch()
                if lease is not None:
                    lease.enter_context(StoreLease(store))
                return store
            busy = in_use(store)
            if busy:
                raise StoreError(store, f"{src} changed since this store was prepared from it ({change}), but the "
                                 f"store is in use by {busy} (a running zoedge finetune or eval), so it is not "
                                 "rebuilt under it", "run this command again when that process has ended")
            log(f"{src} changed since {store} was prepared from it ({change}): preparing it again")
            _remove(store)
        partial = store.with_name(store.name + ".partial")
        pending = store.with_name(store.name + ".partial.json")  # the source record of the partial build
        record = record_source(src)
        if partial.exists() and not (resumable(src, partial, dtype, quant) and _same_contents(pending, record)):
            _remove(partial)  # a build of other contents (prepare alone cannot tell a re-save with the old mtime)
        atomic_write_text(pending, json.dumps(record, indent=1))
        prepare(src, partial, dtype=dtype, quant=quant, progress=progress, log=log)
        os.replace(pending, partial / SOURCE_NAME)
        (partial / LAST_USED).touch()
        os.replace(partial, store)
        if lease is not None:
            lease.enter_context(StoreLease(store))
    return store


def _same_contents(path: Path, record: dict) -> bool:
    try:
        old = json.loads(path.read_text())["files"]
        return {k: v["sha256"] for k, v in old.items()} == {k: v["sha256"] for k, v in record["files"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return False


#: Any one of these file sets is a tokenizer transformers can load.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def require_tokenizer(directory: Path) -> None:
    """Refuse a model directory (checkpoint or store) that has no tokenizer, naming it and the files looked for.

    Raises:
        CheckpointError: for a checkpoint; StoreError for a store (a directory with manifest.json).
    """
    from zoedge.errors import CheckpointError

    if any(all((directory / n).is_file() for n in names) for names in TOKENIZER_FILES):
        return
    wanted = ", ".join(" + ".join(names) for names in TOKENIZER_FILES)
    error = StoreError if (directory / MANIFEST_NAME).is_file() else CheckpointError
    raise error(directory, f"has no tokenizer (none of {wanted})",
                f"copy the tokenizer files of the original checkpoint into {directory} (e.g. "
                f"`AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained('{directory}')`)")


# ----------------------------------------------------------------- cache list / prune
@dataclass
class CachedStore:
    """One prepared store in the cache."""

    path: Path
    bytes: int
    source: str | None  # the checkpoint it was made from (None: unknown, e.g. an unfinished build)
    last_used: float  # seconds since the epoch
    complete: bool

    @property
    def source_exists(self) -> bool:
        return self.source is not None and Path(self.source).is_dir()


def _leftover(name: str) -> str | None:
    """The store name of an unfinished build (``NAME.partial``) or interrupted deletion (``NAME.deleting-PID``)."""
    m = re.fullmatch(r"(.+)\.(partial|deleting-\d+)", name)
    return m.group(1) if m else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cached_stores() -> list[CachedStore]:
    """Every store (and unfinished build) under :func:`stores_dir`, oldest use first."""
    out = []
    root = stores_dir()
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir():
            continue
        source = None
        for name in (SOURCE_NAME, MANIFEST_NAME):
            try:
                source = json.loads((d / name).read_text())["source"]
                source = source["source"] if isinstance(source, dict) else source
                break
            except (OSError, ValueError, KeyError, TypeError):
                continue
        marker = d / LAST_USED
        last = (marker if marker.exists() else d).stat().st_mtime
        out.append(CachedStore(d, _size(d), source if isinstance(source, str) else None, last,
                               (d / MANIFEST_NAME).is_file() and _leftover(d.name) is None))
    return sorted(out, key=lambda s: s.last_used)


def select_for_prune(stores: list[CachedStore], older_than_days: float | None = None, unused: bool = False,
                     everything: bool = False, now: float | None = None) -> list[CachedStore]:
    """The stores a prune removes: all; or those last used more than ``older_than_days`` ago; or (``unused``)
    those whose source directory is gone or that never finished building."""
    if not everything and older_than_days is None and not unused:
        raise ConfigError("zoedge cache prune", "no selection given", "add --all, --older-than DAYS or --unused")
    if older_than_days is not None and not older_than_days >= 0:
        raise ConfigError("--older-than", f"{older_than_days!r}", "give a number of days >= 0")
    now = time.time() if now is None else now
    picked = []
    for s in stores:
        old = older_than_days is not None and now - s.last_used > older_than_days * 86400
        orphan = unused and (not s.complete or not s.source_exists)
        if everything or old or orphan:
            picked.append(s)
    return picked


def prune(stores: list[CachedStore]) -> tuple[int, list[tuple[CachedStore, str]]]:
    """Delete the given stores (each under its build lock) except those in use (a live lease).

    Returns:
        (bytes freed, [(store kept, who uses it)]).
    """
    freed, kept = 0, []
    for s in stores:
        if not s.path.is_relative_to(stores_dir()):
            raise StoreError(s.path, "is not inside the cache", "only stores under " + str(stores_dir()) + " are pruned")
        base = s.path.with_name(_leftover(s.path.name) or s.path.name)
        with _locked(base):
            busy = in_use(s.path)
            if busy:
                kept.append((s, busy))
                continue
            _remove(s.path)
            if s.path.name.endswith(".partial"):
                s.path.with_name(s.path.name + ".json").unlink(missing_ok=True)
        freed += s.bytes
    return freed, kept
