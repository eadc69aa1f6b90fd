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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoedge.errors import StoreError

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
        """Bytes of the dequantized copies this block needs on the device (0 when not quantized)."""
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

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Manifest:
        blocks = [block_from_dict(b) for b in d["blocks"]]
        rest = {k: v for k, v in d.items() if k != "blocks"}
        return Manifest(blocks=blocks, **rest)


def block_from_dict(d: dict[str, Any]) -> BlockEntry:
    tensors = []
    for t in d["tensors"]:
        parts = {k: Part(**p) for k, p in t["parts"].items()}
        tensors.append(TensorEntry(**{**t, "parts": parts}))
    return BlockEntry(**{**d, "tensors": tensors})


def load_manifest(store: str | Path) -> Manifest:
    """Read and check ``store/manifest.json``.

    Raises:
        StoreError: the store is missing, incomplete (no manifest: an interrupted prepare), of another
            format version, or a block file is missing or has the wrong size.
    """
    store = Path(store)
    path = store / MANIFEST_NAME
    if not path.is_file():
        fix = ("re-run `zoedge prepare SRC " + str(store) + "` to finish it" if (store / "blocks").is_dir()
               else "run `zoedge prepare SRC " + str(store) + "` first")
        raise StoreError(store, "is not a complete zoedge block store (no manifest.json)", fix)
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest.from_dict(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(path, f"unreadable manifest ({e})", "re-run `zoedge prepare` into a fresh directory") from None
    if manifest.format_version != FORMAT_VERSION:
        raise StoreError(path, f"format version {manifest.format_version}, this zoedge reads {FORMAT_VERSION}",
                         "re-run `zoedge prepare` with this version of zoedge")
    for b in manifest.blocks:
        f = store / b.file
        if not f.is_file() or f.stat().st_size != b.nbytes:
            size = f.stat().st_size if f.is_file() else "missing"
            raise StoreError(f, f"block {b.name!r} should be {b.nbytes} bytes, found {size}",
                             "the store was damaged; re-run `zoedge prepare` into a fresh directory")
    return manifest
