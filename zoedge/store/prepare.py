"""``zoedge prepare``: repack a Hugging Face checkpoint into a block store, once.

Each streaming unit becomes one contiguous, aligned file, so the runtime moves
a block with a single read and a single host-to-device copy. Safe by
construction:

* the source directory is only ever opened for reading;
* every block is written to a temp file, fsynced and renamed; its sidecar
  (entry + sha256 + a fingerprint of the source and options) is written the
  same way afterwards, so a block without a matching sidecar is redone;
* ``manifest.json`` is written last: a store without it is never loaded.

A killed ``prepare`` re-run with the same arguments keeps the finished blocks.
``DST`` must be new, empty, or such an earlier run (finished or not) of the same
source with the same options; anything else is refused before DST is touched.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from zoedge.adapters import adapter_for, supported_model_types
from zoedge.errors import CheckpointError, ConfigError, StoreError
from zoedge.names import STORE_DTYPES
from zoedge.store.atomic import atomic_write_bytes
from zoedge.store.lease import in_use
from zoedge.store import quant as q
from zoedge.store.manifest import (DTYPES, MANIFEST_NAME, BlockEntry, Manifest, TensorEntry, block_file, block_from_dict,
                                   plan_block)
from zoedge.store.safetensors_io import Checkpoint, open_checkpoint

#: Files copied along so the store is also a tokenizer/config directory.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "chat_template.jinja")


@dataclasses.dataclass
class PrepareSummary:
    """What one ``prepare`` run did (also printed and returned as JSON by the CLI)."""

    store: str
    blocks: int
    reused_blocks: int
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 2**20 / max(self.seconds, 1e-9)


def _fingerprint(src: Path, ckpt: Checkpoint, dtype: str, quant: str) -> dict:
    """Identifies source + options; a sidecar with another fingerprint is stale and its block is redone."""
    # Size and mtime, like make/rsync: a checkpoint re-saved in place (same sizes, new values) is another
    # source, so its old blocks are not reused; hashing every shard would cost a full read.
    files = {sf.path.name: [sf.path.stat().st_size, sf.path.stat().st_mtime_ns] for sf in ckpt.files}
    return {"source": str(src.resolve()), "files": files, "dtype": dtype, "quant": quant}


def _load_config(src: Path) -> PretrainedConfig:
    """``AutoConfig`` of ``src``, with its failures turned into errors naming config.json."""
    path = src / "config.json"
    fix = "re-download config.json from the original checkpoint"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"cannot be read as JSON ({e})", fix) from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, f"is a JSON {type(raw).__name__}, not an object", fix)
    try:
        return AutoConfig.from_pretrained(src)
    except (OSError, ValueError, KeyError, TypeError) as e:
        model_type = raw.get("model_type")
        if model_type not in supported_model_types():
            raise ConfigError(path, f"unsupported architecture model_type={model_type!r} "
                              f"(architectures={raw.get('architectures')})",
                              f"use one of {supported_model_types()}, or add an adapter "
                              "(see zoedge/adapters/base.py)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"transformers cannot read it ({first})", fix) from None


def _check_dst(dst: Path, fp: dict) -> None:
    """Refuse a DST that is not new, empty, or an earlier (possibly unfinished) prepare of the same source
    with the same options. Nothing in DST is changed here."""
    if dst.exists() and not dst.is_dir():
        raise StoreError(dst, "exists and is not a directory", "choose a new or empty directory for DST")
    if not dst.is_dir():
        return
    busy = in_use(dst)
    if busy:
        raise StoreError(dst, f"is in use by {busy} (a running zoedge finetune or eval)",
                         "prepare into another directory, or run prepare again when that process has ended")
    manifest, blocks = dst / MANIFEST_NAME, dst / "blocks"
    if not manifest.exists() and not blocks.is_dir() and any(dst.iterdir()):
        raise StoreError(dst, "is not empty and is not a zoedge block store",
                         "choose a new or empty directory (prepare writes config.json, tokenizer files and "
                         "blocks/ there and must not overwrite your files)")
    other = "choose an empty directory, or delete this one"
    if manifest.is_file():
        try:
            source = json.loads(manifest.read_text()).get("source", {})
        except (OSError, ValueError, AttributeError):
            raise StoreError(manifest, "is unreadable (not a manifest of this zoedge)", other) from None
        if source != fp:
            raise StoreError(dst, "already holds a store of another checkpoint or other options", other)
        return
    # Unfinished store: its sidecars say which source and options it was started with.
    for side in sorted(blocks.glob("*.json")) if blocks.is_dir() else []:
        try:
            started = json.loads(side.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            continue  # a damaged sidecar only means its block is redone
        if started != fp:
            raise StoreError(dst, f"holds an unfinished store of another checkpoint or other options ({side.name})",
                             other + "; to resume it, re-run prepare with its own SRC and options")


def resumable(src: str | Path, dst: str | Path, dtype: str, quant: str) -> bool:
    """Whether ``prepare(src, dst, dtype, quant)`` would accept ``dst`` (new, empty, or an earlier run of the
    same source and options) instead of refusing it."""
    src = Path(src)
    try:
        _check_dst(Path(dst), _fingerprint(src, open_checkpoint(src), dtype, quant))
    except StoreError:
        return False
    return True


def _check_shapes(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]], src: Path, rename: dict[str, str],
                  ignorable: set[str]) -> None:
    """Every tensor the config implies is there, with its shape and a floating-point dtype; no tensor is
    left over (a config with fewer layers than the weights would otherwise drop them silently)."""
    for name, shape in expected.items():
        stored = rename.get(name, name)
        if stored not in ckpt.where:
            raise CheckpointError(src, f"tensor {name!r} required by config.json is missing from the checkpoint",
                                  "check that config.json belongs to these weights, or re-download the checkpoint")
        info = ckpt.info(stored)
        where = f"{ckpt.where[stored].path} (tensor {stored!r})"
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(where, f"shape {tuple(info.shape)} does not match {tuple(shape)} implied by "
                                  "config.json", "use the config.json that belongs to these weights")
        if not info.dtype.is_floating_point:
            raise CheckpointError(where, f"dtype {str(info.dtype).removeprefix('torch.')} is not a floating-point "
                                  "weight (packed-integer formats such as GPTQ/AWQ are not supported)",
                                  "use the original floating-point (F32/F16/BF16) checkpoint; zoedge quantizes it "
                                  "itself with --quant int8 or nf4")
    used = {rename.get(n, n) for n in expected} | ignorable
    extra = sorted(n for n in ckpt.where if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(src, f"{len(extra)} tensors are not used by the model config.json describes: "
                              f"{', '.join(extra[:4])}{f' and {len(extra) - 4} more' if len(extra) > 4 else ''}",
                              "use the config.json that belongs to these weights (e.g. its num_hidden_layers "
                              "must match the layers stored)")


#: Tensors a checkpoint may carry that the model recomputes (rotary tables, causal-mask buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")


def _source_names(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Model name -> checkpoint name. Older OPT checkpoints drop the leading ``model.``."""
    rename = {}
    for name in expected:
        if name not in ckpt.where and name.startswith("model.") and name[6:] in ckpt.where:
            rename[name] = name[6:]
    return rename


def _pack(ckpt: Checkpoint, entries: list[TensorEntry], nbytes: int, dtype: torch.dtype,
          rename: dict[str, str]) -> torch.Tensor:
    """Read, convert and (de)quantize a block's tensors into one flat byte buffer."""
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    for e in entries:
        t = ckpt.read(rename.get(e.name, e.name))
        if e.quant == "none":
            parts = {"data": t.to(dtype).reshape(-1)}
        else:
            parts = q.quantize(t.float(), e.quant, e.blocksize)
        for pname, p in e.parts.items():
            raw = parts[pname].contiguous().reshape(-1).view(torch.uint8)
            buf[p.offset:p.offset + p.nbytes].copy_(raw)
    return buf


def prepare(src: str | Path, dst: str | Path, dtype: str = "fp32", quant: str = "none",
            progress: bool = True, log: Callable[[str], None] = print) -> PrepareSummary:
    """Repack the checkpoint at ``src`` into a block store at ``dst``.

    Args:
        src: HF checkpoint directory (config.json + safetensors). Never modified.
        dst: store directory; created, or resumed when a previous run was interrupted.
        dtype: ``fp32`` | ``bf16`` | ``fp16`` (stored and compute precision).
        quant: ``none`` | ``int8`` | ``nf4`` for the decoder layers' matrices (bitsandbytes).

    Returns:
        A :class:`PrepareSummary`.

    Raises:
        ConfigError: bad option value or unsupported architecture.
        CheckpointError: unreadable / inconsistent source.
        StoreError: ``dst`` not writable, disk full, or already a store of another checkpoint.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if dtype not in STORE_DTYPES:
        raise ConfigError("--dtype", f"unknown value {dtype!r}", "use fp32, bf16 or fp16")
    if quant not in q.QUANT_KINDS:
        raise ConfigError("--quant", f"unknown value {quant!r}", f"use one of {', '.join(q.QUANT_KINDS)}")
    if not (src / "config.json").is_file():
        raise CheckpointError(src, "no config.json (not a Hugging Face checkpoint directory)",
                              "point SRC at the directory holding config.json and *.safetensors")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConfigError("DST", f"{dst} is, or is inside, the source directory {src}",
                          "choose a directory outside SRC: the source is never modified")
    config = _load_config(src)
    adapter = adapter_for(config, DTYPES[dtype], "cpu", where=str(src / "config.json"))
    ckpt = open_checkpoint(src)
    expected = adapter.expected_shapes()
    rename = _source_names(ckpt, expected)
    aliases = set(adapter.tied()) | {a[6:] for a in adapter.tied() if a.startswith("model.")}
    _check_shapes(ckpt, expected, src, rename, aliases)
    fp = _fingerprint(src, ckpt, dtype, quant)

    _check_dst(dst, fp)
    try:
        (dst / "blocks").mkdir(parents=True, exist_ok=True)
        probe = dst / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise StoreError(dst, f"cannot write ({e.strerror})", "choose a writable directory with free space") from None

    blocks, reused, written = [], 0, 0
    names = adapter.block_names()
    bar = tqdm(names, desc="prepare", unit="block", disable=not progress)
    for i, block in enumerate(bar):
        tensors = [n for n in expected if adapter.block_of(n) == block]
        entries, nbytes = plan_block(tensors, expected, DTYPES[dtype], quant, block)
        data_path = dst / block_file(i, block)
        side_path = data_path.with_suffix(".json")
        entry = _reuse(side_path, data_path, fp, entries)
        if entry is not None:
            reused += 1
        else:
            buf = _pack(ckpt, entries, nbytes, DTYPES[dtype], rename)
            data = memoryview(buf.numpy())  # no second copy of the block
            entry = BlockEntry(block, block_file(i, block), nbytes, hashlib.sha256(data).hexdigest(), entries)
            try:
                atomic_write_bytes(data_path, data)
                atomic_write_bytes(side_path, json.dumps({"fingerprint": fp, "entry": dataclasses.asdict(entry)}).encode())
            except OSError as e:
                _raise_write_error(dst, e)
            written += nbytes
        blocks.append(entry)
        bar.set_postfix_str(f"{written / 2**20:.0f} MiB written")
    bar.close()

    manifest = Manifest(architecture=(config.architectures or [type(adapter.skeleton).__name__])[0],
                        family=config.model_type, dtype=dtype, quant=quant, blocks=blocks,
                        tied={a: s for a, s in adapter.tied().items()}, source=fp)
    try:
        for name in SIDE_FILES:
            if (src / name).is_file():  # fsynced like the blocks: the manifest must never outlive them
                atomic_write_bytes(dst / name, (src / name).read_bytes())
        atomic_write_bytes(dst / MANIFEST_NAME, manifest.to_json().encode())
    except OSError as e:
        _raise_write_error(dst, e)
    summary = PrepareSummary(str(dst), len(blocks), reused, manifest.nbytes, time.perf_counter() - t0)
    log(f"prepared {summary.blocks} blocks ({summary.reused_blocks} reused), {summary.bytes / 2**20:.1f} MiB "
        f"in {summary.seconds:.1f} s ({summary.mb_per_s:.0f} MiB/s) -> {dst}")
    return summary


def _reuse(side: Path, data: Path, fp: dict, entries: list[TensorEntry]) -> BlockEntry | None:
    """The finished block from an earlier run, if its sidecar matches and its bytes hash right."""
    if not (side.is_file() and data.is_file()):
        return None
    try:
        meta = json.loads(side.read_text())
        entry = block_from_dict(meta["entry"])
    except (ValueError, KeyError, TypeError, StoreError):
        return None
    if meta.get("fingerprint") != fp or entry.tensors != entries or data.stat().st_size != entry.nbytes:
        return None
    h = hashlib.sha256()
    with open(data, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return entry if h.hexdigest() == entry.sha256 else None


def _raise_write_error(dst: Path, e: OSError) -> None:
    if e.errno == errno.ENOSPC:
        raise StoreError(dst, "disk full while writing the store (finished blocks are kept)",
                         "free space (or choose another DST) and re-run the same command to resume") from None
    raise StoreError(dst, f"cannot write ({e.strerror})",
                     "choose a writable directory; re-running the same command resumes") from None
