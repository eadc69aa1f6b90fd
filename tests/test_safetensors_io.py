"""Tests for zoedge.store.safetensors_io: round-trips and every malformed-input case."""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zoedge.errors import CheckpointError
from zoedge.store.safetensors_io import (
    Checkpoint,
    TensorInfo,
    open_checkpoint,
    read_header,
    read_tensor,
)


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(2, 3, 2, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3),
        "i32": torch.tensor([1, -2, 2**30], dtype=torch.int32),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raw_file(path: Path, header: object | bytes, data: bytes = b"", n: int | None = None) -> Path:
    """Write a safetensors file by hand (header may be bytes to allow invalid JSON)."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if n is None else n) + body + data)
    return path


def _expect_error(path: Path, fn: Callable[[], object], *needles: str) -> CheckpointError:
    """Run fn, expect CheckpointError mentioning path's name and needles, and the file unchanged."""
    before = _sha(path)
    with pytest.raises(CheckpointError) as exc:
        fn()
    msg = str(exc.value)
    assert path.name in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert "Fix:" in msg
    assert _sha(path) == before
    return exc.value


# ---------------------------------------------------------------- round trips


def test_round_trip_single_file(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reference = load_file(str(path))

    st = read_header(path)
    assert st.metadata == {"format": "pt"}
    assert set(st.tensors) == set(tensors)
    starts = [t.start for t in st.tensors.values()]
    assert starts == sorted(starts)  # dict is in file order
    for name, info in st.tensors.items():
        assert info.dtype == reference[name].dtype
        assert info.shape == tuple(reference[name].shape)
        assert info.nbytes == reference[name].numel() * reference[name].element_size()
        got = read_tensor(info, path)
        assert got.dtype == reference[name].dtype and got.shape == reference[name].shape
        assert torch.equal(got, reference[name])


def test_round_trip_rarer_dtypes(tmp_path: Path) -> None:
    # float8 / unsigned / complex: compared bytewise (torch.equal lacks float8 kernels).
    tensors = {"f8": torch.randn(5).to(torch.float8_e4m3fn), "f8b": torch.randn(3).to(torch.float8_e5m2),
               "u16": torch.arange(4).to(torch.uint16), "c64": torch.randn(2, dtype=torch.complex64)}
    path = tmp_path / "rare.safetensors"
    save_file(tensors, str(path))
    for name, info in read_header(path).tensors.items():
        got = read_tensor(info, path)
        assert got.dtype == tensors[name].dtype
        assert torch.equal(got.view(torch.uint8), tensors[name].view(torch.uint8))


def test_read_into_view_of_larger_buffer(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    a, b = torch.randn(2, 3).bfloat16(), torch.randn(4).bfloat16()
    save_file({"a": a, "b": b}, str(path))
    st = read_header(path)
    flat = torch.full((12,), -1.0, dtype=torch.bfloat16)
    ra = read_tensor(st.tensors["a"], path, out=flat[1:7])
    rb = read_tensor(st.tensors["b"], path, out=flat[7:11])
    assert torch.equal(ra, a) and torch.equal(rb, b)
    assert ra.data_ptr() == flat[1:].data_ptr()  # filled in place, no copy
    assert flat[0].item() == -1.0 and flat[11].item() == -1.0  # neighbours untouched
    assert torch.equal(flat[1:7].view(2, 3), a)


def test_read_tensor_rejects_bad_out(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(6)}, str(path))
    info = read_header(path).tensors["a"]
    with pytest.raises(ValueError, match="'a'"):
        read_tensor(info, path, out=torch.zeros(6, dtype=torch.float16))
    with pytest.raises(ValueError):
        read_tensor(info, path, out=torch.zeros(5))
    with pytest.raises(ValueError):
        read_tensor(info, path, out=torch.zeros(6, 2)[:, 0])  # not contiguous


def test_single_file_checkpoint(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    assert isinstance(ckpt, Checkpoint) and len(ckpt.files) == 1
    for name, t in tensors.items():
        assert torch.equal(ckpt.read(name), t)
    with pytest.raises(CheckpointError, match="did you mean") as exc:
        ckpt.info("f33")
    assert "'f33'" in str(exc.value)


def _sharded(tmp_path: Path) -> dict[str, torch.Tensor]:
    tensors = _sample_tensors()
    names = sorted(tensors)
    shard1, shard2 = names[: len(names) // 2], names[len(names) // 2:]
    save_file({n: tensors[n] for n in shard1}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in shard2}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in shard1}
    weight_map |= {n: "model-00002-of-00002.safetensors" for n in shard2}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map}))
    return tensors


def test_sharded_checkpoint(tmp_path: Path) -> None:
    tensors = _sharded(tmp_path)
    ckpt = open_checkpoint(str(tmp_path))
    assert len(ckpt.files) == 2 and set(ckpt.where) == set(tensors)
    for name, t in tensors.items():
        assert ckpt.info(name).name == name
        assert torch.equal(ckpt.read(name), t)
        assert torch.equal(ckpt.read(name), load_file(str(ckpt.where[name].path))[name])


# ------------------------------------------------------ bad safetensors files

GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def test_too_short(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    _expect_error(path, lambda: read_header(path), "too short")


def test_header_too_large(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "big.safetensors", GOOD, bytes(8))
    _expect_error(path, lambda: read_header(path, max_header_bytes=10), "header too large")
    huge = _raw_file(tmp_path / "huge.safetensors", b"{}", n=2**63)
    _expect_error(huge, lambda: read_header(huge), "header too large")


def test_header_truncated(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "cut.safetensors", b'{"w": {', n=500)
    _expect_error(path, lambda: read_header(path), "truncated", "re-download")


@pytest.mark.parametrize("body, needle", [
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"w": ', "does not parse"),
    (b"[1, 2]", "not an object"),
    (b'{"__metadata__": {"a": 1}}', "__metadata__"),
])
def test_bad_json(tmp_path: Path, body: bytes, needle: str) -> None:
    path = _raw_file(tmp_path / "bad.safetensors", body)
    _expect_error(path, lambda: read_header(path), needle)


@pytest.mark.parametrize("entry, needle", [
    (5, "not an object"),
    ({"shape": [2], "data_offsets": [0, 8]}, "'dtype'"),
    ({"dtype": "F32", "data_offsets": [0, 8]}, "'shape'"),
    ({"dtype": "F32", "shape": [2]}, "'data_offsets'"),
    ({"dtype": 7, "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
    ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype 'Q4'"),
    ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "not a list of integers"),
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "not a list of integers"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 8]}, "not a list of integers"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "negative"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "not a pair"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}, "not a pair"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "reversed"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}, "truncated"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12"),
    ({"dtype": "BF16", "shape": [2], "data_offsets": [0, 8]}, "needs 4"),
])
def test_bad_entry(tmp_path: Path, entry: object, needle: str) -> None:
    path = _raw_file(tmp_path / "entry.safetensors", {"ok": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
                                                      "bad.weight": entry}, bytes(8))
    _expect_error(path, lambda: read_header(path), "'bad.weight'", needle)


def test_data_beyond_end_says_redownload(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "trunc.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                     bytes(10))
    err = _expect_error(path, lambda: read_header(path), "'w'", "truncated")
    assert "re-download" in err.fix and "bytes" in err.fix


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    path = _raw_file(tmp_path / "overlap.safetensors", header, bytes(12))
    _expect_error(path, lambda: read_header(path), "'b'", "'a'", "overlap")


def test_empty_tensors_do_not_overlap(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]}}
    path = _raw_file(tmp_path / "ok.safetensors", header, bytes(8))
    assert list(read_header(path).tensors) == ["a", "e"]


def test_duplicate_tensor_name(tmp_path: Path) -> None:
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [%d, %d]}'
    body = ('{"w.dup": ' + entry % (0, 4) + ', "w.dup": ' + entry % (4, 8) + "}").encode()
    path = _raw_file(tmp_path / "dup.safetensors", body, bytes(8))
    _expect_error(path, lambda: read_header(path), "'w.dup'", "twice")


def test_file_truncated_after_header_read(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(100)}, str(path))
    st = read_header(path)
    info: TensorInfo = st.tensors["b"]
    path.write_bytes(path.read_bytes()[: info.start + 10])
    _expect_error(path, lambda: read_tensor(info, path), "'b'", "truncated")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        read_header(tmp_path / "nope.safetensors")


# ------------------------------------------------------- bad checkpoint dirs


def test_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not an existing directory"):
        open_checkpoint(tmp_path / "absent")


def test_dir_without_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        open_checkpoint(tmp_path)


def test_refuses_pickle(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="unpickle") as exc:
        open_checkpoint(tmp_path)
    assert "safetensors" in exc.value.fix


def test_index_bad_json(tmp_path: Path) -> None:
    _sharded(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {')
    _expect_error(index, lambda: open_checkpoint(tmp_path), "does not parse")
    index.write_text('{"metadata": {}}')
    _expect_error(index, lambda: open_checkpoint(tmp_path), "weight_map")


def _edit_index(tmp_path: Path, edit: Callable[[dict[str, str]], None]) -> Path:
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return index


def test_index_missing_shard(tmp_path: Path) -> None:
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    index = tmp_path / "model.safetensors.index.json"
    _expect_error(index, lambda: open_checkpoint(tmp_path), "model-00002-of-00002.safetensors", "missing")


def test_index_tensor_not_in_shard(tmp_path: Path) -> None:
    _sharded(tmp_path)
    index = _edit_index(tmp_path, lambda wm: wm.update({"lm_head.weight": "model-00001-of-00002.safetensors"}))
    _expect_error(index, lambda: open_checkpoint(tmp_path), "'lm_head.weight'", "does not contain")


def test_index_shard_path_escape(tmp_path: Path) -> None:
    _sharded(tmp_path)
    index = _edit_index(tmp_path, lambda wm: wm.update({"f32": "../model-00001-of-00002.safetensors"}))
    _expect_error(index, lambda: open_checkpoint(tmp_path), "'f32'", "not a plain file name")


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    tensors = _sharded(tmp_path)
    shard2 = tmp_path / "model-00002-of-00002.safetensors"
    extra = load_file(str(shard2)) | {"f32": tensors["f32"]}  # f32 lives in shard 1 too
    save_file(extra, str(shard2))
    _expect_error(shard2, lambda: open_checkpoint(tmp_path), "'f32'", "also stored in")


def test_corrupt_shard_named(tmp_path: Path) -> None:
    _sharded(tmp_path)
    shard = tmp_path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    _expect_error(shard, lambda: open_checkpoint(tmp_path), "truncated", "re-download")
