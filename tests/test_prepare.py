"""Acceptance of ``zoedge prepare``: bad inputs, resume, quantized and low-precision stores, the CLI.

Every bad input is checked three ways: the Python API raises a
:class:`~zoedge.errors.ZoedgeError` subclass whose message names the file (and
tensor), the problem and a fix; ``zoedge.cli.main`` returns a non-zero exit code
with ``error: <message>`` on stderr; and the source directory is byte-identical
afterwards (sha256 of every file, and no file added or removed).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import zoedge
import zoedge.cli
import zoedge.store.atomic
import zoedge.store.prepare as prep
from zoedge.cli import main
from zoedge.errors import CheckpointError, ConfigError, StoreError, ZoedgeError
from zoedge.store import quant as q
from zoedge.store.manifest import MANIFEST_NAME, load_manifest
from tests.tiny import batch, resident_logits, save_tiny

QUIET = {"progress": False, "log": lambda line: None}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------- helpers
def digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (directories listed too, so additions show)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def prepare(src: Path, dst: Path, **kw) -> prep.PrepareSummary:
    return zoedge.prepare(src, dst, **QUIET, **kw)


def cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(capsys, src: Path, dst: Path, exc_type: type[ZoedgeError], *fragments: str,
                   **options: str) -> ZoedgeError:
    """prepare(src, dst) fails with ``exc_type`` naming ``fragments`` + a fix, the CLI exits != 0 with the
    same message, and ``src`` is byte-identical afterwards. Returns the error."""
    before = digest(src)
    with pytest.raises(exc_type) as info:
        prepare(src, dst, **options)
    err = info.value
    msg = str(err)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert err.fix and f"Fix: {err.fix}" in msg and err.problem in msg
    argv = ["prepare", src, dst, "--no-progress"] + [x for k, v in options.items() for x in (f"--{k}", v)]
    rc, _, stderr = cli(capsys, *argv)
    assert rc == err.exit_code != 0
    assert stderr.startswith("error: ") and msg in stderr
    assert digest(src) == before, "the source checkpoint was modified"
    return err


def header_of(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def rewrite_header(path: Path, edit) -> None:
    """Re-serialise ``path``'s safetensors header after ``edit(header)``; the data buffer is kept."""
    raw = path.read_bytes()
    n, header = header_of(path)
    edit(header)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def n_blocks(src: Path) -> int:
    return json.loads((src / "config.json").read_text())["num_hidden_layers"] + 2


def block_files(dst: Path) -> list[Path]:
    return sorted((dst / "blocks").glob("*.bin"))


def mtimes(paths: list[Path]) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in paths}


class FailWrite:
    """Patch ``open`` inside zoedge.store.atomic so the real ``atomic_write_bytes`` fails writing block ``at``.

    The failing write stores half the bytes in the temp file and then raises ``exc`` (ENOSPC = disk full,
    KeyboardInterrupt = Ctrl-C), as a real write would part-way through.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int, exc: BaseException) -> None:
        self.at, self.exc, self.failed = at, exc, 0
        monkeypatch.setattr(zoedge.store.atomic, "open", self._open, raising=False)

    def _open(self, path, mode="r", *args, **kwargs):
        name = Path(path).name
        if "w" not in mode or not (name.startswith(f"{self.at:04d}.") and name.endswith(".bin.tmp")):
            return open(path, mode, *args, **kwargs)
        owner = self

        class Failing(io.BufferedWriter):
            def write(self, data):  # noqa: D102
                super().write(memoryview(data)[: len(data) // 2])
                self.flush()
                owner.failed += 1
                raise owner.exc

        return Failing(io.FileIO(path, "wb"))


@pytest.fixture
def llama_src(tmp_path: Path) -> Path:
    save_tiny("llama", tmp_path / "hf")
    return tmp_path / "hf"


# --------------------------------------------------------- bad checkpoints
def test_truncated_shard(capsys, llama_src, tmp_path):
    f = llama_src / "model.safetensors"
    _, header = header_of(f)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    f.write_bytes(f.read_bytes()[:-100])
    assert_refused(capsys, llama_src, tmp_path / "store", CheckpointError, str(f), repr(last), "truncated",
                   "re-download")


def _bad_json(f: Path) -> None:
    raw = f.read_bytes()
    f.write_bytes(raw[:8] + b'{"x": nul' + raw[17:])


def _header_too_large(f: Path) -> None:
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**40) + raw[8:])


def _offsets_out_of_range(f: Path) -> None:
    rewrite_header(f, lambda h: h["model.norm.weight"]["data_offsets"].__setitem__(1, 10**7))


def _size_mismatch(f: Path) -> None:  # offsets inside the file but not what dtype x shape needs
    def edit(h):
        b, e = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [b, e - 4]
    rewrite_header(f, edit)


def _overlap(f: Path) -> None:  # o_proj and q_proj are both 32x32 fp32: same size, so only the overlap is wrong
    def edit(h):
        h["model.layers.0.self_attn.o_proj.weight"]["data_offsets"] = \
            list(h["model.layers.0.self_attn.q_proj.weight"]["data_offsets"])
    rewrite_header(f, edit)


@pytest.mark.parametrize("corrupt, fragments", [
    (_bad_json, ["(header)", "JSON does not parse"]),
    (_header_too_large, ["header too large", str(2**40)]),
    (_offsets_out_of_range, ["'model.norm.weight'", "data ends at byte"]),
    (_size_mismatch, ["'model.norm.weight'", "data bytes but dtype F32"]),
    (_overlap, ["'model.layers.0.self_attn.q_proj.weight'", "'model.layers.0.self_attn.o_proj.weight'", "overlap"]),
], ids=["bad-json", "header-too-large", "offsets-out-of-range", "size-mismatch", "overlap"])
def test_corrupt_header(capsys, llama_src, tmp_path, corrupt, fragments):
    f = llama_src / "model.safetensors"
    corrupt(f)
    assert_refused(capsys, llama_src, tmp_path / "store", CheckpointError, str(f), "re-download", *fragments)
    assert not (tmp_path / "store").exists()  # refused before DST is created


def test_sharded_checkpoint_and_missing_shard(capsys, tmp_path):
    model = save_tiny("llama", tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) >= 3
    # A sharded checkpoint gives the same blocks as the single-file one.
    prepare(tmp_path / "one", tmp_path / "s1")
    prepare(tmp_path / "sharded", tmp_path / "s2")
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in block_files(tmp_path / "s1")] == \
           [hashlib.sha256(p.read_bytes()).hexdigest() for p in block_files(tmp_path / "s2")]
    ids, mask = batch()
    torch.testing.assert_close(zoedge.load(tmp_path / "s2")(ids, mask), resident_logits(model, ids, mask),
                               rtol=0, atol=1e-6)

    src = tmp_path / "broken"
    shutil.copytree(tmp_path / "sharded", src)
    (src / shards[1].name).unlink()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    in_missing = sorted(k for k, v in index["weight_map"].items() if v == shards[1].name)
    err = assert_refused(capsys, src, tmp_path / "store", CheckpointError, "model.safetensors.index.json",
                         f"names shard {shards[1].name!r}", "missing", f"download {shards[1].name}")
    assert any(repr(t) in str(err) for t in in_missing)


@pytest.mark.parametrize("change, tensor, problem", [
    ({"hidden_size": 48}, "model.embed_tokens.weight", "shape (97, 32) does not match (97, 48)"),
    ({"vocab_size": 100}, "model.embed_tokens.weight", "shape (97, 32) does not match (100, 32)"),
    ({"intermediate_size": 80}, "model.layers.0.mlp.gate_proj.weight", "does not match (80, 32)"),
    ({"num_hidden_layers": 4}, "model.layers.3.self_attn.q_proj.weight", "is missing from the checkpoint"),
], ids=["hidden", "vocab", "intermediate", "layers"])
def test_config_does_not_match_tensors(capsys, llama_src, tmp_path, change, tensor, problem):
    edit_config(llama_src, **change)
    err = assert_refused(capsys, llama_src, tmp_path / "store", CheckpointError, repr(tensor), problem,
                         "config.json")
    if "shape" in problem:
        assert str(llama_src / "model.safetensors") in str(err)


def test_unsupported_architecture(capsys, tmp_path):
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert (tmp_path / "gpt2" / "model.safetensors").is_file()
    err = assert_refused(capsys, tmp_path / "gpt2", tmp_path / "store", ConfigError,
                         str(tmp_path / "gpt2" / "config.json"), "unsupported architecture", "'gpt2'", "llama", "opt")
    assert "adapter" in err.fix


def test_unknown_model_type_and_bad_config_json(capsys, llama_src, tmp_path):
    edit_config(llama_src, model_type="no_such_arch")
    assert_refused(capsys, llama_src, tmp_path / "s1", ConfigError, str(llama_src / "config.json"),
                   "'no_such_arch'", "unsupported architecture")
    (llama_src / "config.json").write_text('{"model_type": "llama",')
    assert_refused(capsys, llama_src, tmp_path / "s2", CheckpointError, str(llama_src / "config.json"),
                   "cannot be read as JSON", "re-download")


# ----------------------------------------------------------------- bad DST
def test_dst_under_a_regular_file(capsys, llama_src, tmp_path):
    """Fails for real even as root: a directory cannot be created below a regular file (ENOTDIR)."""
    (tmp_path / "a-file").write_text("x")
    assert_refused(capsys, llama_src, tmp_path / "a-file" / "store", StoreError, str(tmp_path / "a-file" / "store"),
                   "cannot write", "Not a directory", "writable directory")
    assert_refused(capsys, llama_src, tmp_path / "a-file", StoreError, "exists and is not a directory")
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.fixture
def immutable_dir(tmp_path: Path):
    """An empty directory nobody can write into, root included: ``chattr +i`` (skipped where unsupported)."""
    d = tmp_path / "readonly"
    d.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("chattr not installed")
    r = subprocess.run(["chattr", "+i", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"chattr +i unsupported here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def test_dst_read_only_immutable(capsys, llama_src, immutable_dir):
    """Really read-only as root too: the immutable attribute stops root's writes (EPERM)."""
    assert_refused(capsys, llama_src, immutable_dir, StoreError, str(immutable_dir), "cannot write",
                   "Operation not permitted", "writable directory")
    assert list(immutable_dir.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores chmod (see the chattr test)")
def test_dst_read_only_chmod(capsys, llama_src, tmp_path):
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    try:
        assert_refused(capsys, llama_src, d, StoreError, str(d), "cannot write", "Permission denied")
    finally:
        d.chmod(0o755)


def test_dst_read_only_when_a_block_is_written(capsys, llama_src, tmp_path, monkeypatch):
    """EACCES/EROFS in the middle of the run (e.g. a remount): the same kind of message, finished blocks kept."""
    FailWrite(monkeypatch, at=1, exc=OSError(errno.EROFS, os.strerror(errno.EROFS)))
    err = assert_refused(capsys, llama_src, tmp_path / "store", StoreError, str(tmp_path / "store"), "cannot write",
                         "Read-only file system", "re-running the same command resumes")
    assert isinstance(err, StoreError)


def test_dst_not_empty_or_inside_src(capsys, llama_src, tmp_path):
    other = tmp_path / "my-other-model"
    save_tiny("opt", other)
    before = digest(other)
    assert_refused(capsys, llama_src, other, StoreError, str(other), "is not empty and is not a zoedge block store",
                   "must not overwrite your files")
    assert digest(other) == before
    assert_refused(capsys, llama_src, tmp_path, StoreError, "is not empty")  # the parent of SRC
    assert_refused(capsys, llama_src, llama_src, ConfigError, "inside, the source directory")
    assert_refused(capsys, llama_src, llama_src / "store", ConfigError, "inside, the source directory")


def test_disk_full_keeps_finished_blocks_and_resumes(capsys, llama_src, tmp_path, monkeypatch):
    ref = prepare(llama_src, tmp_path / "ref")
    dst, k = tmp_path / "store", 3
    with monkeypatch.context() as mp:
        fail = FailWrite(mp, at=k, exc=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        assert_refused(capsys, llama_src, dst, StoreError, str(dst), "disk full", "finished blocks are kept",
                       "free space", "re-run the same command to resume")
        assert fail.failed == 2  # API and CLI both hit the full disk at block k
    assert not list(dst.rglob("*.tmp"))  # the partial temp file was removed (it held the space)
    done = sorted((dst / "blocks").iterdir())
    assert [p.name[:4] for p in done] == [f"{i:04d}" for i in range(k) for _ in range(2)]  # .bin + .json each
    before = mtimes(done)
    with pytest.raises(StoreError, match=r"no manifest\.json.*Fix: re-run `zoedge prepare"):
        zoedge.load(dst)

    again = prepare(llama_src, dst)
    assert (again.blocks, again.reused_blocks) == (ref.blocks, k)
    assert again.bytes == ref.bytes
    assert mtimes(done) == before  # reused, not rewritten
    assert digest(dst) == digest(tmp_path / "ref")  # byte-identical to an uninterrupted prepare


# ------------------------------------------------------------------ resume
def test_interrupted_prepare_resumes_via_cli(capsys, llama_src, tmp_path, monkeypatch):
    prepare(llama_src, tmp_path / "ref")
    dst, k = tmp_path / "store", 2
    with monkeypatch.context() as mp:
        FailWrite(mp, at=k, exc=KeyboardInterrupt())
        rc, _, err = cli(capsys, "prepare", llama_src, dst, "--no-progress")
    assert rc == 130
    assert "interrupted" in err and "re-run the same command to resume" in err
    finished = block_files(dst)
    assert len(finished) == k
    before = mtimes(finished)
    rc, out, _ = cli(capsys, "prepare", llama_src, dst, "--no-progress", "--json", tmp_path / "summary.json")
    assert rc == 0 and f"({k} reused)" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["reused_blocks"] == k and summary["blocks"] == n_blocks(llama_src)
    assert mtimes(finished) == before
    assert digest(dst) == digest(tmp_path / "ref")


def test_corrupted_finished_block_is_redone(llama_src, tmp_path):
    prepare(llama_src, tmp_path / "ref")
    dst = tmp_path / "store"
    prepare(llama_src, dst)
    files = block_files(dst)
    victim = files[2]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit: same size, so only the sha256 can tell
    victim.write_bytes(bytes(raw))
    others = mtimes([p for p in files if p != victim])
    s = prepare(llama_src, dst)
    assert s.reused_blocks == s.blocks - 1
    assert mtimes([p for p in files if p != victim]) == others
    assert digest(dst) == digest(tmp_path / "ref")

    # A damaged sidecar or a short block file: also redone.
    (dst / "blocks" / files[1].name.replace(".bin", ".json")).write_text("{not json")
    with open(files[3], "r+b") as f:
        f.truncate(100)
    s = prepare(llama_src, dst)
    assert s.reused_blocks == s.blocks - 2
    assert digest(dst) == digest(tmp_path / "ref")


def test_leftover_tmp_files_are_never_accepted(llama_src, tmp_path):
    """As after a kill -9: finished blocks 0..k-1, block k only as a (complete!) .bin.tmp with its sidecar,
    and a manifest.json.tmp. Neither temp file may count as written."""
    ref = tmp_path / "ref"
    prepare(llama_src, ref)
    dst, k = tmp_path / "store", 2
    (dst / "blocks").mkdir(parents=True)
    for p in block_files(ref)[:k]:
        for f in (p, p.with_suffix(".json")):
            shutil.copy2(f, dst / "blocks" / f.name)
    kth = block_files(ref)[k]
    shutil.copy2(kth, dst / "blocks" / (kth.name + ".tmp"))
    shutil.copy2(kth.with_suffix(".json"), dst / "blocks" / kth.with_suffix(".json").name)
    shutil.copy2(ref / MANIFEST_NAME, dst / (MANIFEST_NAME + ".tmp"))

    with pytest.raises(StoreError, match=r"no manifest\.json.*re-run `zoedge prepare"):
        zoedge.load(dst)
    s = prepare(llama_src, dst)
    assert s.reused_blocks == k
    assert not list(dst.rglob("*.tmp"))
    assert digest(dst) == digest(ref)


def test_store_without_manifest_is_refused_by_load(llama_src, tmp_path):
    dst = tmp_path / "store"
    prepare(llama_src, dst)
    zoedge.load(dst).close()
    (dst / MANIFEST_NAME).unlink()
    with pytest.raises(StoreError) as info:
        zoedge.load(dst)
    msg = str(info.value)
    assert str(dst) in msg and "no manifest.json" in msg and "re-run `zoedge prepare" in msg
    with pytest.raises(StoreError, match=r"no manifest\.json.*run `zoedge prepare SRC"):
        zoedge.load(tmp_path / "nothing-here")


def test_store_of_another_checkpoint_is_refused(capsys, tmp_path, monkeypatch):
    a = save_tiny("llama", tmp_path / "a", seed=0)
    save_tiny("llama", tmp_path / "b", seed=1)
    dst = tmp_path / "store"
    prepare(tmp_path / "a", dst)
    before = digest(dst)
    assert_refused(capsys, tmp_path / "b", dst, StoreError, str(dst), "another checkpoint or other options",
                   "choose an empty directory")
    assert_refused(capsys, tmp_path / "a", dst, StoreError, "another checkpoint or other options", dtype="bf16")
    assert_refused(capsys, tmp_path / "a", dst, StoreError, "another checkpoint or other options", quant="int8")
    assert digest(dst) == before
    ids, mask = batch()
    torch.testing.assert_close(zoedge.load(dst)(ids, mask), resident_logits(a, ids, mask), rtol=0, atol=1e-6)

    # The same directory re-saved with other values (same sizes): another checkpoint, not a resume.
    save_tiny("llama", tmp_path / "a", seed=2)
    assert_refused(capsys, tmp_path / "a", dst, StoreError, "another checkpoint")

    # An unfinished store of another checkpoint is refused too (not silently overwritten).
    part = tmp_path / "partial"
    with monkeypatch.context() as mp:
        FailWrite(mp, at=2, exc=KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path / "b", part)
    before = digest(part)
    assert_refused(capsys, tmp_path / "a", part, StoreError, "unfinished store of another checkpoint",
                   "re-run prepare with its own SRC")
    assert digest(part) == before
    assert prepare(tmp_path / "b", part).reused_blocks == 2


# -------------------------------------------------- quantized / low precision
def _dequantized_reference(src: Path, fp32_model: torch.nn.Module, kind: str, dtype: str) -> torch.nn.Module:
    """The resident HF model in ``dtype`` whose decoder-layer matrices are replaced by their dequantized values."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=TORCH_DTYPES[dtype]).eval()
    orig = fp32_model.state_dict()
    names = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and q.should_quantize(name, tuple(p.shape), kind):
                bs = q.DEFAULT_BLOCKSIZE[kind]
                parts = q.quantize(orig[name].float(), kind, bs)
                p.copy_(q.dequantize(kind, parts, tuple(p.shape), TORCH_DTYPES[dtype], bs))
                names.add(name)
    model.quantized_names = names
    return model


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_quantized_store_equals_dequantized_resident(tmp_path, family, kind, dtype):
    fp32_model = save_tiny(family, tmp_path / "hf")
    prepare(tmp_path / "hf", tmp_path / "full")
    s = prepare(tmp_path / "hf", tmp_path / "q", dtype=dtype, quant=kind)
    manifest = load_manifest(tmp_path / "q")
    stored_q = {t.name for b in manifest.blocks for t in b.tensors if t.quant != "none"}
    assert all(t.quant == kind for b in manifest.blocks for t in b.tensors if t.quant != "none")

    ref_model = _dequantized_reference(tmp_path / "hf", fp32_model, kind, dtype)
    assert stored_q == ref_model.quantized_names and len(stored_q) >= 4 * 3  # every layer's matrices
    ids, mask = batch()
    ref = resident_logits(ref_model, ids, mask)
    # The quantization error is far above the tolerance, so a store that ignored --quant would fail.
    assert (ref.float() - resident_logits(fp32_model, ids, mask)).abs().max() > 20e-6
    for tier in ("ram", "disk"):
        m = zoedge.load(tmp_path / "q", tier=tier)
        got = m(ids, mask)
        assert got.dtype == TORCH_DTYPES[dtype]
        if dtype == "fp32":
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        else:  # same bf16 weights, same kernels: exact
            assert torch.equal(got, ref)
        m.close()
    full = sum(p.stat().st_size for p in block_files(tmp_path / "full"))
    assert sum(p.stat().st_size for p in block_files(tmp_path / "q")) == s.bytes < full


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt"])
def test_low_precision_store_equals_resident(tmp_path, family, dtype):
    """The store equals ``from_pretrained(SRC, dtype=...)`` exactly (max |Δ| = 0), both tiers.

    (A model cast with ``.to(bf16)`` differs: it also casts the rotary ``inv_freq`` buffer, which
    ``from_pretrained`` and zoedge keep in fp32.)"""
    save_tiny(family, tmp_path / "hf")
    prepare(tmp_path / "hf", tmp_path / "store", dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=TORCH_DTYPES[dtype]).eval()
    ids, mask = batch()
    ref = resident_logits(model, ids, mask)
    for tier in ("ram", "disk"):
        m = zoedge.load(tmp_path / "store", tier=tier, prefetch=2)
        got = m(ids, mask)
        assert got.dtype == TORCH_DTYPES[dtype] and torch.equal(got, ref)
        m.close()


# --------------------------------------------------------------------- CLI
def test_cli_help_and_usage_errors(capsys, llama_src, tmp_path):
    rc, out, _ = cli(capsys, "--help")
    assert rc == 0 and "prepare" in out
    rc, out, _ = cli(capsys, "prepare", "--help")
    assert rc == 0 and "--quant" in out and "--json" in out
    rc, _, err = cli(capsys)
    assert rc == 2 and "prepare" in err
    rc, _, err = cli(capsys, "prepare", llama_src, tmp_path / "store", "--quant", "int4")
    assert rc == 2 and "int4" in err
    rc, _, err = cli(capsys, "no-such-command")
    assert rc == 2
    rc, _, err = cli(capsys, "prepare", llama_src, tmp_path / "store", "--json", tmp_path / "no" / "dir.json")
    assert rc == 2 and err.startswith("error: --json") and "does not exist" in err
    assert not (tmp_path / "store").exists()  # checked before the work starts


def test_cli_prepare_summary_and_json(capsys, llama_src, tmp_path):
    dst = tmp_path / "store"
    rc, out, _ = cli(capsys, "prepare", llama_src, dst, "--no-progress", "--json", tmp_path / "s.json")
    assert rc == 0
    assert "prepared" in out and "(0 reused)" in out and str(dst) in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["blocks"] == n_blocks(llama_src) and summary["reused_blocks"] == 0
    assert summary["bytes"] == load_manifest(dst).nbytes
    assert {"seconds", "mb_per_s", "dtype", "quant", "store", "source"} <= set(summary)
    rc, out, err = cli(capsys, "prepare", llama_src, dst, "--no-progress", "--json", "-")
    assert rc == 0 and json.loads(out)["reused_blocks"] == n_blocks(llama_src) and "prepared" in err
    rc, out, _ = cli(capsys, "prepare", llama_src, tmp_path / "q", "--no-progress", "--dtype", "bf16",
                     "--quant", "nf4")
    assert rc == 0
    m = load_manifest(tmp_path / "q")
    assert (m.dtype, m.quant) == ("bf16", "nf4")


def test_cli_broken_command_module_does_not_break_others(capsys, llama_src, tmp_path, monkeypatch):
    real_import = zoedge.cli.importlib.import_module

    def fake_import(name, *a, **kw):
        if name == "zoedge.commands.exploding":
            raise RuntimeError("boom at import")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(zoedge.cli.importlib, "import_module", fake_import)
    monkeypatch.setitem(sys.modules, "zoedge.commands.hollow", types.ModuleType("zoedge.commands.hollow"))
    monkeypatch.setattr(zoedge.cli, "COMMANDS", ["prepare", "exploding", "missing_module", "hollow"])
    rc, out, _ = cli(capsys, "--help")
    assert rc == 0 and "prepare" in out and "unavailable: RuntimeError: boom at import" in out
    rc, _, _ = cli(capsys, "prepare", llama_src, tmp_path / "store", "--no-progress")
    assert rc == 0 and (tmp_path / "store" / MANIFEST_NAME).is_file()
    rc, _, err = cli(capsys, "exploding", "--some-option")
    assert rc == 2 and err.startswith("error: command 'exploding'") and "boom at import" in err
    rc, _, err = cli(capsys, "missing_module")
    assert rc == 2 and "ModuleNotFoundError" in err
    rc, _, err = cli(capsys, "hollow")
    assert rc == 2 and "add_parser" in err


def test_cli_bug_is_not_swallowed(llama_src, tmp_path, monkeypatch):
    """Only ZoedgeError and Ctrl-C become messages; anything else is a bug and keeps its traceback."""
    def broken(*a, **kw):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(prep, "prepare", broken)
    with pytest.raises(ZeroDivisionError):
        main(["prepare", str(llama_src), str(tmp_path / "store")])
