"""The block store's manifest: what every streaming unit holds and where.

A prepared store is a directory::

    DST/
      manifest.json            written last and atomically: its presence marks a complete store
      config.json, tokenizer*  copied from the source checkpoint
      blocks/NNN.<block>.bin   one contiguous region per streaming unit (embed, layers.i, head)
      blocks/NNN.<block>.json  per-block sidecar (its entry + source fingerprint): lets `prepare` resume

Inside a block file every tensor (or quantized part) starts at a multiple of
``ALIGN`` bytes, so a device slot can expose it as a typed view of one flat
buffer without copies.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoedge.errors import StoreError
from zoedge.names import STORE_DTYPES  # noqa: F401 (re-exported)

FORMAT_VERSION = 1
ALIGN = 256  # bytes; covers every dtype's alignment and CUDA's 256-byte allocation granularity
MANIFEST_NAME = "manifest.json"

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "uint8": torch.uint8,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_of(name: str) -> torch.dtype:
    """Map a manifest dtype name to a torch dtype (raises StoreError on an unknown name)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise StoreError("manifest", f"unknown dtype {name!r}", f"use one of {sorted(DTYPES)}; re-run `zoedge prepare`") from None


def align(n: int) -> int:
    """Round ``n`` up to the next multiple of ``ALIGN``."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Part:
    """One raw tensor inside a block region (a plain tensor or one part of a quantized one)."""

    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


@dataclass
class TensorEntry:
    """A model tensor in a block: either ``quant == "none"`` with one part named ``"data"``,
    or a quantized tensor whose parts (data, absmax, ...) are dequantized to ``dtype``/``shape``."""

    name: str
    dtype: str
    shape: list[int]
    quant: str = "none"
    blocksize: int = 0
    parts: dict[str, Part] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class BlockEntry:
    """One streaming unit."""

    name: str
    file: str
    nbytes: int
    sha256: str
    tensors: list[TensorEntry]

    @property
    def dequant_nbytes(self) -> int:
        """Bytes of this block's quantized tensors once dequantized (0 when not quantized); the runtime never holds
        them all at once (each matrix is expanded at its op, see zoedge/runtime/dequantized.py)."""
        return sum(align(t.numel * dtype_of(t.dtype).itemsize)
                   for t in self.tensors if t.quant != "none")


@dataclass
class Manifest:
    """The whole store. ``tied`` maps an alias tensor name to the stored tensor it shares."""

    architecture: str
    family: str
    dtype: str
    quant: str
    blocks: list[BlockEntry]
    tied: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def block(self, name: str) -> BlockEntry:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def block_file(index: int, block: str) -> str:
    """The store-relative file of the ``index``-th block (``blocks/0003.layers.2.bin``)."""
    return f"blocks/{index:04d}.{block}.bin"


def plan_block(names: list[str], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, quant: str,
               block: str) -> tuple[list[TensorEntry], int]:
    """Place a block's tensors (and quantized parts) at aligned offsets; return entries and total bytes.

    The layout is a function of the config, dtype and quant kind alone: ``prepare`` writes it, and
    :func:`load_manifest` requires a manifest to hold exactly it.
    """
    from zoedge.store import quant as q

    entries, off = [], 0
    for name in names:
        shape = shapes[name]
        kind = quant if (block.startswith("layers.") and quant != "none" and q.should_quantize(name, shape, quant)) else "none"
        if kind == "none":
            specs = {"data": (dtype, (math.prod(shape),))}
            blocksize = 0
        else:
            blocksize = q.DEFAULT_BLOCKSIZE[kind]
            specs = q.part_specs(kind, shape, blocksize)
        parts = {}
        for pname, (pdtype, pshape) in specs.items():
            nbytes = math.prod(pshape) * pdtype.itemsize
            parts[pname] = Part(DTYPE_NAMES[pdtype], list(pshape), off, nbytes)
            off = align(off + nbytes)
        entries.append(TensorEntry(name, DTYPE_NAMES[dtype], list(shape), kind, blocksize, parts))
    return entries, off


# ----------------------------------------------------------------- reading
MAX_MANIFEST_BYTES = 64 * 2**20  # a 1000-layer store's manifest is a few MB
_REPREPARE = "the store is damaged or was edited; re-run `zoedge prepare` into a fresh directory"


class _Bad(Exception):
    """A manifest field is malformed: ``args = (json path, problem)``."""


def _typed(d: object, key: str, kind: str, where: str) -> Any:
    """``d[key]`` checked to be of ``kind``: str, uint (a non-negative int), shape, list or dict."""
    if not isinstance(d, dict):
        raise _Bad(where, f"is a JSON {type(d).__name__}, not an object")
    if key not in d:
        raise _Bad(where, f"has no {key!r} field")
    v = d[key]
    if kind == "str":
        ok = isinstance(v, str)
    elif kind == "uint":
        ok = _is_uint(v)
    elif kind == "shape":
        ok = type(v) is list and len(v) <= 8 and all(_is_uint(x) for x in v)
    else:
        ok = isinstance(v, list if kind == "list" else dict)
    if not ok:
        want = {"uint": "a non-negative integer", "shape": "a list of at most 8 non-negative integers"}.get(kind, kind)
        raise _Bad(f"{where}.{key}", f"is {json.dumps(v)[:60]}, not {want}")
    return v


def _is_uint(x: object) -> bool:
    return type(x) is int and x >= 0  # JSON true is not a size


def _only(d: dict, keys: tuple[str, ...], where: str) -> None:
    extra = sorted(set(d) - set(keys))
    if extra:
        raise _Bad(where, f"has unknown fields {extra}")


def _part(d: object, where: str) -> Part:
    p = Part(_typed(d, "dtype", "str", where), _typed(d, "shape", "shape", where),
             _typed(d, "offset", "uint", where), _typed(d, "nbytes", "uint", where))
    _only(d, ("dtype", "shape", "offset", "nbytes"), where)  # type: ignore[arg-type]
    return p


def _tensor(d: object, where: str) -> TensorEntry:
    parts = _typed(d, "parts", "dict", where)
    t = TensorEntry(_typed(d, "name", "str", where), _typed(d, "dtype", "str", where),
                    _typed(d, "shape", "shape", where), _typed(d, "quant", "str", where),
                    _typed(d, "blocksize", "uint", where),
                    {k: _part(p, f"{where}.parts.{k}") for k, p in parts.items()})
    _only(d, ("name", "dtype", "shape", "quant", "blocksize", "parts"), where)  # type: ignore[arg-type]
    return t


def _block(d: object, where: str) -> BlockEntry:
    tensors = _typed(d, "tensors", "list", where)
    b = BlockEntry(_typed(d, "name", "str", where), _typed(d, "file", "str", where), _typed(d, "nbytes", "uint", where),
                   _typed(d, "sha256", "str", where),
                   [_tensor(t, f"{where}.tensors[{i}]") for i, t in enumerate(tensors)])
    _only(d, ("name", "file", "nbytes", "sha256", "tensors"), where)  # type: ignore[arg-type]
    if len(b.sha256) != 64 or any(c not in "0123456789abcdef" for c in b.sha256):
        raise _Bad(f"{where}.sha256", f"{b.sha256[:70]!r} is not a hex sha256")
    return b


def block_from_dict(d: object) -> BlockEntry:
    """A :class:`BlockEntry` from its JSON form (types checked).

    Raises:
        StoreError: a field is missing, unknown or of the wrong type.
    """
    try:
        return _block(d, "block")
    except _Bad as e:
        raise StoreError(f"block entry ({e.args[0]})", e.args[1], _REPREPARE) from None


def manifest_from_dict(d: object, where: str | Path = MANIFEST_NAME) -> Manifest:
    """A :class:`Manifest` from parsed JSON, every field's type checked (no cross-checks: see :func:`load_manifest`).

    Raises:
        StoreError: a field is missing, unknown or of the wrong type; the format version is another one.
    """
    try:
        version = _typed(d, "format_version", "uint", "manifest")
        if version != FORMAT_VERSION:
            raise StoreError(where, f"format version {version}, this zoedge reads {FORMAT_VERSION}",
                             "re-run `zoedge prepare` with this version of zoedge")
        blocks, tied = _typed(d, "blocks", "list", "manifest"), _typed(d, "tied", "dict", "manifest")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
            raise _Bad("manifest.tied", "is not a name -> name object")
        m = Manifest(_typed(d, "architecture", "str", "manifest"), _typed(d, "family", "str", "manifest"),
                     _typed(d, "dtype", "str", "manifest"), _typed(d, "quant", "str", "manifest"),
                     [_block(b, f"manifest.blocks[{i}]") for i, b in enumerate(blocks)], dict(tied),
                     _typed(d, "source", "dict", "manifest"), version)
        _only(d, tuple(f.name for f in dataclasses.fields(Manifest)), "manifest")  # type: ignore[arg-type]
        return m
    except _Bad as e:
        raise StoreError(f"{where} ({e.args[0]})", e.args[1], _REPREPARE) from None


def _block_path(store: Path, b: BlockEntry, where: str) -> Path:
    """The block's file, refused unless it is a plain ``blocks/NAME`` file that really lies inside the store."""
    parts = b.file.split("/")
    if (len(parts) != 2 or parts[0] != "blocks" or parts[1] in ("", ".", "..") or "\\" in b.file
            or "\0" in b.file):
        raise StoreError(where, f"block {b.name!r} names file {b.file!r}, which is not a file under blocks/ of "
                         "the store (zoedge never reads outside a store)", _REPREPARE)
    path = store / b.file
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise StoreError(path, f"block {b.name!r}: the file is a link (to {path.resolve()}); a store holds its "
                         "own block files", _REPREPARE)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != b.nbytes:
        size = st.st_size if st is not None and stat.S_ISREG(st.st_mode) else "missing"
        raise StoreError(path, f"block {b.name!r} should be {b.nbytes} bytes, found {size}",
                         "the store was damaged; re-run `zoedge prepare` into a fresh directory")
    return path


def _expected_parts(t: TensorEntry) -> dict[str, tuple[str, list[int]]]:
    """What a tensor entry's parts must be, from its own dtype, shape, quant and block size."""
    from zoedge.store import quant as q

    if t.quant == "none":
        if t.blocksize != 0:
            raise ValueError(f"blocksize {t.blocksize} on an unquantized tensor (must be 0)")
        return {"data": (t.dtype, [t.numel])}
    specs = q.part_specs(t.quant, tuple(t.shape), t.blocksize)
    return {k: (DTYPE_NAMES[dt], list(shape)) for k, (dt, shape) in specs.items()}


def check_layout(m: Manifest, where: str) -> None:
    """Cross-check the manifest's own fields: dtypes, quant kinds, part sizes, offsets inside the block and
    not overlapping, unique names, tied names.

    Raises:
        StoreError: naming the block/tensor, the bad value and what it should be.
    """
    from zoedge.errors import ConfigError
    from zoedge.store import quant as q

    def bad(what: str, problem: str) -> StoreError:
        return StoreError(f"{where} ({what})", problem, _REPREPARE)

    if m.dtype not in STORE_DTYPES:
        raise bad("dtype", f"{m.dtype!r} is not a store dtype (one of {STORE_DTYPES})")
    if m.quant not in q.QUANT_KINDS:
        raise bad("quant", f"{m.quant!r} is not one of {q.QUANT_KINDS}")
    if not m.blocks:
        raise bad("blocks", "the store has no blocks")
    seen_blocks: set[str] = set()
    seen_files: set[str] = set()
    stored: set[str] = set()
    for b in m.blocks:
        if b.name in seen_blocks or b.file in seen_files:
            raise bad(f"block {b.name!r}", f"block name or file {b.file!r} appears twice")
        seen_blocks.add(b.name)
        seen_files.add(b.file)
        spans = []
        for t in b.tensors:
            at = f"block {b.name!r}, tensor {t.name!r}"
            if t.name in stored:
                raise bad(at, "the tensor is stored twice")
            stored.add(t.name)
            if t.dtype != m.dtype:
                raise bad(at, f"dtype {t.dtype!r} differs from the store's {m.dtype!r}")
            if t.quant not in ("none", m.quant):
                raise bad(at, f"quant {t.quant!r} differs from the store's {m.quant!r}")
            try:
                want = _expected_parts(t)
            except (ConfigError, ValueError) as e:
                raise bad(at, f"quant {t.quant!r} with block size {t.blocksize} and shape {t.shape} is impossible "
                          f"({e})") from None
            if sorted(t.parts) != sorted(want):
                raise bad(at, f"parts {sorted(t.parts)} should be {sorted(want)}")
            for pname, p in t.parts.items():
                dt, shape = want[pname]
                if p.dtype != dt or p.shape != shape:
                    raise bad(f"{at}, part {pname!r}", f"dtype/shape {p.dtype} {p.shape} should be {dt} {shape}")
                size = math.prod(shape) * dtype_of(dt).itemsize
                if p.nbytes != size:
                    raise bad(f"{at}, part {pname!r}", f"nbytes {p.nbytes} should be {size}")
                if p.offset % ALIGN or p.offset + p.nbytes > b.nbytes:
                    raise bad(f"{at}, part {pname!r}", f"offset {p.offset} (+{p.nbytes} bytes) is not a multiple of "
                              f"{ALIGN} inside the block's {b.nbytes} bytes")
                if p.nbytes:
                    spans.append((p.offset, p.offset + p.nbytes, f"{t.name}/{pname}"))
        spans.sort()
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise bad(f"block {b.name!r}", f"{second} at byte {start} overlaps {first} (ends at {end})")
    for alias, target in m.tied.items():
        if alias in stored or target not in stored:
            raise bad(f"tied {alias!r}", f"must alias a stored tensor and not be stored itself (target {target!r})")


_Facts = tuple[str, list[str], dict[str, tuple[int, ...]], dict[str, "str | None"], dict[str, str]]
_ADAPTER_FACTS: dict[tuple[str, str], _Facts] = {}


def _adapter_facts(store: Path, dtype: str) -> _Facts:
    """Model type, block names, expected shapes, tensor -> block and tied names that ``store/config.json`` implies
    (memoized by the config's text: building the meta skeleton costs ~0.1 s)."""
    from transformers import AutoConfig

    from zoedge.adapters import adapter_for

    path = store / "config.json"
    if not path.is_file():
        raise StoreError(store, "has no config.json (a store holds a copy of its checkpoint's config.json)",
                         f"copy config.json from the original checkpoint into {store}, or re-run `zoedge prepare`")
    try:
        text = path.read_text()
        key = (text, dtype)
        if key in _ADAPTER_FACTS:
            return _ADAPTER_FACTS[key]
        config = AutoConfig.from_pretrained(store)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StoreError(path, f"cannot be read ({first})", "copy config.json from the original checkpoint") from None
    adapter = adapter_for(config, dtype_of(dtype), "cpu", where=str(path))
    expected = adapter.expected_shapes()
    facts = (config.model_type, adapter.block_names(), expected, {n: adapter.block_of(n) for n in expected},
             dict(adapter.tied()))
    _ADAPTER_FACTS[key] = facts
    return facts


def check_against_config(m: Manifest, store: Path, where: str) -> None:
    """The manifest must hold exactly the blocks and tensors (names, shapes, tied names) that the store's
    config.json implies.

    Raises:
        StoreError: naming the missing or extra blocks/tensors, or the shape that differs.
    """
    model_type, names, expected, block_of, tied = _adapter_facts(store, m.dtype)
    fix = (f"the manifest does not belong to {store / 'config.json'}: restore the config.json the store was "
           "prepared with, or re-run `zoedge prepare` into a fresh directory")
    if m.family != model_type:
        raise StoreError(where, f"family {m.family!r} differs from model_type {model_type!r} in config.json", fix)
    have = [b.name for b in m.blocks]
    if have != names:
        extra, missing = [n for n in have if n not in names], [n for n in names if n not in have]
        detail = (f"extra blocks {extra[:5]}" if extra else "") + (f" missing blocks {missing[:5]}" if missing else "")
        raise StoreError(where, f"holds blocks {have[:2]}...{have[-2:]} ({len(have)}) but config.json implies "
                         f"{len(names)} ({detail.strip() or 'another order'})", fix)
    stored = {t.name: (b.name, t) for b in m.blocks for t in b.tensors}
    extra = sorted(set(stored) - set(expected))
    missing = sorted(set(expected) - set(stored))
    if extra or missing:
        raise StoreError(where, f"tensors do not match config.json: extra {extra[:5]}, missing {missing[:5]}", fix)
    for name, (block, t) in stored.items():
        if block_of[name] != block:
            raise StoreError(where, f"tensor {name!r} is in block {block!r}, config.json puts it in {block_of[name]!r}",
                             fix)
        if tuple(t.shape) != tuple(expected[name]):
            raise StoreError(where, f"tensor {name!r} has shape {t.shape}, config.json implies "
                             f"{list(expected[name])}", fix)
    if m.tied != tied:
        raise StoreError(where, f"tied weights {m.tied} differ from {tied} implied by config.json", fix)
    # Everything else is a function of config, dtype and quant: a manifest must hold exactly that layout
    # (so no edit of offsets, order or parts can make a tensor read another tensor's bytes).
    for i, b in enumerate(m.blocks):
        order = [n for n in expected if block_of[n] == b.name]
        plan, nbytes = plan_block(order, expected, dtype_of(m.dtype), m.quant, b.name)
        if b.file != block_file(i, b.name):
            raise StoreError(where, f"block {b.name!r} names file {b.file!r}, prepare writes it to "
                             f"{block_file(i, b.name)!r}", fix)
        for got, want in zip(b.tensors, plan):
            if got != want:
                raise StoreError(where, f"block {b.name!r}: entry of tensor {got.name!r} differs from the layout "
                                 f"prepare writes ({_first_difference(got, want)})", fix)
        if len(b.tensors) != len(plan) or b.nbytes != nbytes:
            raise StoreError(where, f"block {b.name!r} has {b.nbytes} bytes / {len(b.tensors)} tensors, the layout "
                             f"prepare writes has {nbytes} / {len(plan)}", fix)


def _first_difference(got: TensorEntry, want: TensorEntry) -> str:
    a, b = dataclasses.asdict(got), dataclasses.asdict(want)
    for key in b:
        if a[key] != b[key]:
            return f"{key} is {json.dumps(a[key])[:120]}, expected {json.dumps(b[key])[:120]}"
    return "?"


def unfinished_store_error(store: Path) -> StoreError:
    """The error for a store whose ``prepare`` never finished, naming the command that finishes it."""
    started = None
    for side in sorted((store / "blocks").glob("*.json")):
        try:
            fp = json.loads(side.read_text())["fingerprint"]
            started = f"`zoedge prepare {fp['source']} {store} --dtype {fp['dtype']} --quant {fp['quant']}`"
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return StoreError(store, "is an unfinished zoedge block store (no manifest.json: `zoedge prepare` was "
                      "interrupted or failed)",
                      f"re-run {started or '`zoedge prepare SRC ' + str(store) + '`'} to finish it (finished "
                      "blocks are kept), or delete the directory")


def _no_manifest(store: Path) -> StoreError:
    """The error for a directory without manifest.json, saying what the directory is instead."""
    if not store.exists():
        return StoreError(store, "does not exist (no manifest.json: not a zoedge block store)",
                          f"run `zoedge prepare SRC {store}` first, or give the path of an existing store")
    if (store / "blocks").is_dir():
        return unfinished_store_error(store)
    if (store / "config.json").is_file() and (any(store.glob("*.safetensors")) or
                                             (store / "model.safetensors.index.json").is_file()):
        return StoreError(store, "is a Hugging Face checkpoint, not a prepared zoedge block store (no manifest.json)",
                          f"run `zoedge prepare {store} STORE` and use STORE (the finetune and eval commands "
                          "take the checkpoint as --model and prepare it themselves)")
    return StoreError(store, "is not a zoedge block store (no manifest.json)",
                      f"run `zoedge prepare SRC {store}` into a new or empty directory first")


def load_manifest(store: str | Path, verify: bool = True) -> Manifest:
    """Read ``store/manifest.json`` and check the whole store before any of its bytes are used.

    Checks, in order: every manifest field's type; the fields against each other (dtypes, part sizes, offsets
    inside their block and not overlapping, tied names); block files (plain files under ``blocks/`` inside
    the store, of the recorded size); the blocks and tensors against ``config.json``; and with ``verify``
    every block's sha256 (hashed only when the file changed since it last hashed right: see
    :mod:`zoedge.store.verify`).

    Raises:
        StoreError: the store is missing, unfinished, of another format version, or anything above fails
            (the message names the file or field, the bad value and the fix).
    """
    store = Path(store)
    path = store / MANIFEST_NAME
    if not path.is_file():
        raise _no_manifest(store)
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise StoreError(path, f"is {size} bytes, more than any manifest ({MAX_MANIFEST_BYTES})", _REPREPARE)
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise StoreError(path, f"unreadable manifest ({str(e)[:200]})", _REPREPARE) from None
    manifest = manifest_from_dict(raw, path)
    check_layout(manifest, str(path))
    blocks_dir = store / "blocks"
    if blocks_dir.is_symlink():  # with plain blocks/NAME files, this makes every block file lie inside the store
        raise StoreError(blocks_dir, f"is a link (to {blocks_dir.resolve()}); a store holds its own block files",
                         _REPREPARE)
    files = [_block_path(store, b, str(path)) for b in manifest.blocks]
    check_against_config(manifest, store, str(path))
    if verify:
        from zoedge.store.verify import verify_blocks
        verify_blocks(store, [(b.name, b.sha256, f) for b, f in zip(manifest.blocks, files)])
    return manifest
