"""Safe, validated reading of safetensors checkpoints, one tensor at a time.

We parse the header ourselves instead of memory-mapping the file with the
``safetensors`` library: the checkpoint is untrusted input (a truncated
download, a hand-edited shard), and every inconsistency must become a
:class:`~zoedge.errors.CheckpointError` naming the file, the tensor and the fix
*before* we read tensor bytes. Nothing here ever unpickles, and files are only
opened for reading.

File layout: 8-byte little-endian u64 ``N``, ``N`` bytes of UTF-8 JSON header,
then the data buffer; ``data_offsets`` are relative to the buffer start ``8+N``.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zoedge.errors import CheckpointError

MAX_HEADER_BYTES: int = 100 * 2**20

# safetensors dtype codes -> torch dtypes (only those torch can hold).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
    "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_REDOWNLOAD = "re-download or re-copy this file from the original checkpoint"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (offsets are absolute)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        """Number of data bytes (``end - start``)."""
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsFile:
    """A validated safetensors header."""

    path: Path
    header_size: int
    tensors: dict[str, TensorInfo]  # in file order of data offsets
    metadata: dict[str, str]


class _DuplicateKey(ValueError):
    """A JSON object repeats a key (the key is ``args[0]``)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; a header naming a
    # tensor twice is ambiguous (which bytes are it?), so refuse it instead.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _load_json(raw: bytes, what: str, fix: str) -> Any:
    """Decode UTF-8 JSON, rejecting duplicate keys; errors become CheckpointError."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CheckpointError(what, f"key {e.args[0]!r} appears twice in the JSON", fix) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(what, f"JSON is not valid UTF-8 ({e.reason} at byte {e.start})", fix) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(what, f"JSON does not parse ({e})", fix) from None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a size


def _parse_entry(name: str, entry: object, path: Path, data_start: int, file_size: int) -> TensorInfo:
    """Validate one header entry and turn it into absolute offsets."""
    what = f"{path} (tensor {name!r})"
    if not isinstance(entry, dict):
        raise CheckpointError(what, f"header entry is {type(entry).__name__}, not an object", _REDOWNLOAD)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise CheckpointError(what, f"header entry has no {key!r} field", _REDOWNLOAD)
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in _DTYPES:
        raise CheckpointError(what, f"unknown dtype {code!r}",
                              f"use one of {sorted(_DTYPES)} (re-save the checkpoint with a supported dtype)")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise CheckpointError(what, f"shape {shape!r} is not a list of integers", _REDOWNLOAD)
    if any(d < 0 for d in shape):
        raise CheckpointError(what, f"shape {shape} has a negative dimension", _REDOWNLOAD)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(what, f"data_offsets {offsets!r} is not a pair of integers", _REDOWNLOAD)
    begin, end = offsets
    if begin < 0 or begin > end:
        raise CheckpointError(what, f"data_offsets [{begin}, {end}] are reversed or negative", _REDOWNLOAD)
    if data_start + end > file_size:
        raise CheckpointError(
            what, f"data ends at byte {data_start + end} but the file has only {file_size} bytes (truncated)",
            f"{_REDOWNLOAD}; its size is {file_size} bytes but the header needs {data_start + end}")
    dtype = _DTYPES[code]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != expected:
        raise CheckpointError(
            what, f"{end - begin} data bytes but dtype {code} x shape {shape} needs {expected}",
            f"{_REDOWNLOAD}; the header is inconsistent with its own dtype/shape")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: str | Path, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsFile:
    """Read and fully validate the header of one safetensors file.

    Args:
        path: the ``.safetensors`` file.
        max_header_bytes: refuse headers larger than this (guards memory).
    Returns:
        The parsed header, tensors ordered by their position in the file.
    Raises:
        CheckpointError: the file is missing, truncated, or its header is malformed
            or inconsistent (bad JSON, dtype/shape vs. size, overlapping tensors).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, f"file is only {file_size} bytes, too short for a safetensors header",
                                      _REDOWNLOAD)
            (n,) = struct.unpack("<Q", prefix)
            if n > max_header_bytes:
                raise CheckpointError(path, f"header too large ({n} bytes > limit {max_header_bytes})",
                                      f"{_REDOWNLOAD}; a real header is at most a few MB, so this is corrupt "
                                      "or not a safetensors file")
            if 8 + n > file_size:
                raise CheckpointError(path, f"header needs {8 + n} bytes but the file has only {file_size} "
                                      "(truncated)", f"{_REDOWNLOAD}; its size is {file_size} bytes but the "
                                      f"header needs {8 + n}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(path, f"cannot read the file ({e.strerror or e})",
                              "check that the path exists and is readable") from None

    header = _load_json(raw, f"{path} (header)", _REDOWNLOAD)
    if not isinstance(header, dict):
        raise CheckpointError(path, f"header is a JSON {type(header).__name__}, not an object", _REDOWNLOAD)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, f"__metadata__ {metadata!r} is not a str->str object", _REDOWNLOAD)

    infos = [_parse_entry(name, entry, path, 8 + n, file_size) for name, entry in header.items()]
    # Two tensors sharing bytes would alias each other's data; sorted by start,
    # any overlap shows up between neighbours. Empty tensors own no bytes.
    infos.sort(key=lambda t: (t.start, t.end))
    prev: TensorInfo | None = None
    for info in (t for t in infos if t.nbytes):
        if prev is not None and info.start < prev.end:
            raise CheckpointError(
                f"{path} (tensor {info.name!r})",
                f"bytes [{info.start}, {info.end}) overlap tensor {prev.name!r} at [{prev.start}, {prev.end})",
                _REDOWNLOAD)
        prev = info
    return SafetensorsFile(path, n, {t.name: t for t in infos}, dict(metadata))


def read_tensor(info: TensorInfo, path: Path, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes straight into CPU memory.

    Args:
        info: the tensor's entry from :func:`read_header` of ``path``.
        path: the file holding it.
        out: optional contiguous CPU destination of ``info.dtype`` with the same
            number of elements (e.g. a slice of a larger flat buffer).
    Returns:
        A tensor of ``info.shape`` (a view of ``out`` when given).
    Raises:
        CheckpointError: the file cannot be read or ends early (it was
            truncated after the header was read).
        ValueError: ``out`` has the wrong dtype, size, device or layout.
    """
    numel = info.nbytes // max(1, torch.empty((), dtype=info.dtype).element_size())
    if out is None:
        out = torch.empty(numel, dtype=info.dtype)
    elif out.dtype != info.dtype or out.numel() != numel or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out for {info.name!r} must be a contiguous CPU {info.dtype} tensor with {numel} "
                         f"elements, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if sys.byteorder != "little":  # safetensors data is little-endian; we never byte-swap
        raise CheckpointError(path, "this machine is big-endian", "run on a little-endian host")
    if numel == 0:
        return out.view(info.shape)
    # A flat uint8 numpy view of `out` exposes its memory as a writable buffer,
    # so readinto fills the tensor with no intermediate bytes object.
    buf = memoryview(out.detach().view(-1).view(torch.uint8).numpy())
    done = 0
    try:
        # buffering=0: raw reads go straight into `buf` (a buffered reader would
        # copy through its own buffer). Raw reads may be short (Linux caps one
        # read at ~2 GiB), so loop until filled or EOF.
        with open(path, "rb", buffering=0) as f:
            f.seek(info.start)
            while done < info.nbytes:
                got = f.readinto(buf[done:])
                if not got:
                    break
                done += got
    except OSError as e:
        raise CheckpointError(f"{path} (tensor {info.name!r})", f"cannot read the file ({e.strerror or e})",
                              "check that the file exists and is readable") from None
    if done < info.nbytes:
        raise CheckpointError(
            f"{path} (tensor {info.name!r})",
            f"file ends at byte {info.start + done} but the tensor needs bytes up to {info.end} (truncated)",
            f"{_REDOWNLOAD}; it shrank after its header was read")
    return out.view(info.shape)


@dataclass(frozen=True)
class Checkpoint:
    """A validated Hugging Face safetensors checkpoint directory."""

    directory: Path
    files: list[SafetensorsFile]
    where: dict[str, SafetensorsFile]  # tensor name -> file holding it

    def info(self, name: str) -> TensorInfo:
        """Look up a tensor.

        Args:
            name: the tensor name, e.g. ``"model.layers.0.mlp.up_proj.weight"``.
        Returns:
            Its :class:`TensorInfo`.
        Raises:
            CheckpointError: no tensor of that name (close matches are suggested).
        """
        file = self.where.get(name)
        if file is None:
            close = difflib.get_close_matches(name, list(self.where), n=3)
            hint = f"did you mean {close}?" if close else "check the model architecture matches this checkpoint"
            raise CheckpointError(f"{self.directory} (tensor {name!r})", "no such tensor in the checkpoint", hint)
        return file.tensors[name]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (see :func:`read_tensor`).

        Args:
            name: the tensor name.
            out: optional destination, as for :func:`read_tensor`.
        Returns:
            The tensor, shaped.
        Raises:
            CheckpointError: unknown tensor, or the shard cannot be read.
        """
        return read_tensor(self.info(name), self.where[name].path, out)


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Open and validate a checkpoint directory (``model.safetensors`` or a sharded index).

    Like transformers, a single ``model.safetensors`` wins when both are present.

    Args:
        directory: the Hugging Face model directory.
    Returns:
        The checkpoint with every shard header validated.
    Raises:
        CheckpointError: missing directory or weights, pickle-only weights,
            a malformed index, a missing shard, a tensor the index puts in a
            shard that lacks it, a tensor in two shards, or a bad shard header.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(directory, "is not an existing directory", "pass the model directory that holds "
                              "config.json and the *.safetensors files")
    single, index_path = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        file = read_header(single)
        return Checkpoint(directory, [file], {name: file for name in file.tensors})
    if not index_path.is_file():
        if (directory / "pytorch_model.bin").exists() or (directory / "pytorch_model.bin.index.json").exists():
            raise CheckpointError(directory, "has only pytorch_model.bin weights; zoedge refuses to unpickle them "
                                  "(loading a pickle can run arbitrary code)",
                                  "convert the checkpoint to safetensors (e.g. load it once in transformers from "
                                  "a trusted source and save_pretrained(..., safe_serialization=True))")
        raise CheckpointError(directory, "has neither model.safetensors nor model.safetensors.index.json",
                              "point at a Hugging Face model directory with safetensors weights")

    index_fix = "re-download model.safetensors.index.json from the original checkpoint"
    try:
        raw = index_path.read_bytes()
    except OSError as e:
        raise CheckpointError(index_path, f"cannot read the index ({e.strerror or e})", index_fix) from None
    index = _load_json(raw, str(index_path), index_fix)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index_path, "has no non-empty \"weight_map\" object", index_fix)

    shards: dict[str, SafetensorsFile] = {}
    for tensor, shard in sorted(weight_map.items(), key=lambda kv: str(kv[1])):
        what = f"{index_path} (tensor {tensor!r})"
        # The index is untrusted too: a shard name like "../../x" must not
        # make us read files outside the checkpoint directory.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(what, f"shard name {shard!r} is not a plain file name", index_fix)
        if shard not in shards:
            if not (directory / shard).is_file():
                raise CheckpointError(what, f"names shard {shard!r}, which is missing from {directory}",
                                      f"download {shard} into {directory}")
            shards[shard] = read_header(directory / shard)
        if tensor not in shards[shard].tensors:
            raise CheckpointError(what, f"the index puts it in {shard!r}, whose header does not contain it",
                                  f"{index_fix}, or re-download {shard}")

    # Every tensor in any shard header, so extras the index forgot are readable,
    # but one name in two shards is ambiguous and refused.
    where: dict[str, SafetensorsFile] = {}
    for file in shards.values():
        for name in file.tensors:
            if name in where:
                raise CheckpointError(f"{file.path} (tensor {name!r})",
                                      f"also stored in {where[name].path.name}",
                                      f"{_REDOWNLOAD} (the shards belong to different checkpoints)")
            where[name] = file
    return Checkpoint(directory, list(shards.values()), where)


# ------------------------------------------------------------------------------------------- streamed writing
@dataclass
class WeightStream:
    """Tensors that arrive a few at a time (e.g. one streamed block each), with their layout known up front.

    ``entries``: (name, dtype, shape) of every tensor, in the order ``chunks`` delivers them; ``chunks``: an
    iterable of mappings name -> tensor (iterated once).
    """

    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
    chunks: Iterable[Mapping[str, torch.Tensor]]

    @classmethod
    def of(cls, weights: Mapping[str, torch.Tensor]) -> WeightStream:
        """All of ``weights`` as one chunk; tied aliases (a tensor sharing an earlier one's storage) dropped."""
        unique: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in weights.items():
            if v.data_ptr() not in seen or v.numel() == 0:
                seen.add(v.data_ptr())
                unique[k] = v
        return cls([(k, v.dtype, tuple(v.shape)) for k, v in unique.items()], [unique])


def write_streamed(path: str | Path, weights: WeightStream, metadata: dict[str, str] | None = None,
                   check: Callable[[Mapping[str, torch.Tensor]], None] | None = None) -> None:
    """Write a safetensors file chunk by chunk, so memory holds one chunk, not the file's tensors.

    Args:
        path: the file to write (created or truncated; callers write into a temporary name and rename).
        weights: the tensors; the header is written first from ``weights.entries``.
        metadata: the header's ``__metadata__``.
        check: called on each chunk before its bytes are written (e.g. refuse non-finite weights).

    Raises:
        ValueError: a chunk's tensor does not match the next entry (name, dtype or shape), or tensors are
            missing at the end.
    """
    codes = {dt: code for code, dt in _DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, dtype, shape in weights.entries:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-aligned
    expected = iter(weights.entries)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for chunk in weights.chunks:
            if check is not None:
                check(chunk)
            _write_chunk(f, chunk, expected, path)
            del chunk  # before the next one is produced: one chunk in memory at a time
        f.flush()
        os.fsync(f.fileno())  # durable before the caller renames it into place
    missing = [e[0] for e in expected]
    if missing:
        raise ValueError(f"{path}: the chunks ended before the tensors {missing[:3]}...")


def _write_chunk(f, chunk: Mapping[str, torch.Tensor], expected, path) -> None:
    for name, t in chunk.items():
        want = next(expected, None)
        if want is None or (name, t.dtype, tuple(t.shape)) != (want[0], want[1], tuple(want[2])):
            raise ValueError(f"{path}: got tensor {name} {t.dtype} {tuple(t.shape)}, expected {want}")
        view = memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            done += f.write(view[done:])
