"""A store's bytes are checked before use; cached stores follow their source; store errors name the culprit.

Each case here loaded garbage, served a stale store or raised a traceback before these checks existed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoedge
import zoedge.store.verify as verify
from zoedge.cli import main
from zoedge.errors import CheckpointError, StoreError
from zoedge.store import cache
from zoedge.store.manifest import ALIGN, MANIFEST_NAME, load_manifest
from zoedge.train.job import resolve_store
from tests.test_tasks import _tokenizer
from tests.tiny import save_tiny

QUIET = {"progress": False, "log": lambda line: None}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    save_tiny("llama", root / "hf")  # tied embeddings: the manifest has a tied entry
    _tokenizer(bos=True).save_pretrained(root / "hf")
    zoedge.prepare(root / "hf", root / "store", **QUIET)
    return root


@pytest.fixture()
def store(pristine, tmp_path, monkeypatch) -> Path:
    """A fresh copy of a valid store, with no stamps in this process's memory."""
    monkeypatch.setattr(verify, "_MEMORY", {})
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(pristine / "store", tmp_path / "store")
    shutil.copytree(pristine / "hf", tmp_path / "hf")
    return tmp_path / "store"


def edit_manifest(store: Path, change) -> None:
    raw = json.loads((store / MANIFEST_NAME).read_text())
    change(raw)
    (store / MANIFEST_NAME).write_text(json.dumps(raw))


def block(raw: dict, name: str) -> dict:
    return next(b for b in raw["blocks"] if b["name"] == name)


def refused(store: Path, *words: str) -> str:
    with pytest.raises(StoreError) as info:
        zoedge.load(store)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


def count_hashes(monkeypatch) -> list[Path]:
    hashed: list[Path] = []
    real = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", lambda p: hashed.append(p) or real(p))
    return hashed


# ------------------------------------------------------------------ block bytes
def test_flipped_byte_is_refused(store):
    victim = store / "blocks" / "0001.layers.0.bin"
    raw = bytearray(victim.read_bytes())
    raw[3] ^= 0x40  # the exponent byte of the first fp32 weight: same size, very different value
    victim.write_bytes(bytes(raw))
    refused(store, str(victim), "'layers.0' is corrupt", "sha256", "zoedge prepare")


def test_flip_after_stamping_is_refused_even_with_mtime_restored(store, monkeypatch):
    monkeypatch.setattr(verify, "RACY_NS", 0)
    zoedge.load(store).close()
    assert (store / verify.VERIFIED_NAME).is_file()
    victim = store / "blocks" / "0002.layers.1.bin"
    st = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before: ctime still tells
    monkeypatch.setattr(verify, "_MEMORY", {})
    refused(store, "'layers.1' is corrupt")
    # and in the same process, without clearing its memory: the stamp changed, so it is hashed again
    victim.write_bytes(bytes(raw))
    refused(store, "'layers.1' is corrupt")


def test_block_changed_while_hashed_is_refused_and_not_stamped(store, monkeypatch):
    """A writer changes a block while it is being hashed, after the hash read it (so the hash matches the
    manifest), size and mtime put back: the load is refused, and nothing was stamped for the block, so the next
    load hashes it again and finds the change."""
    monkeypatch.setattr(verify, "RACY_NS", 0)  # no stamp is distrusted for being recent: only the check refuses
    victim = store / "blocks" / "0002.layers.1.bin"
    real = verify.sha256_file

    def hash_then_write(path):
        digest = real(path)
        if Path(path).name == victim.name:
            st = victim.stat()
            raw = bytearray(victim.read_bytes())
            raw[7] ^= 0x10
            victim.write_bytes(bytes(raw))
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        return digest

    monkeypatch.setattr(verify, "sha256_file", hash_then_write)
    refused(store, str(victim), "'layers.1' changed while it was being verified")
    monkeypatch.setattr(verify, "sha256_file", real)
    monkeypatch.setattr(verify, "_MEMORY", {})
    refused(store, "'layers.1' is corrupt")


def test_stamped_load_hashes_nothing_and_a_touched_block_is_rehashed(store, monkeypatch):
    monkeypatch.setattr(verify, "RACY_NS", 0)
    hashed = count_hashes(monkeypatch)
    zoedge.load(store).close()
    n = len(load_manifest(store, verify=False).blocks)
    assert len(hashed) == n
    monkeypatch.setattr(verify, "_MEMORY", {})  # a new process: only the stamp file remembers
    hashed.clear()
    zoedge.load(store).close()
    assert hashed == []
    os.utime(store / "blocks" / "0000.embed.bin")
    zoedge.load(store).close()
    assert [p.name for p in hashed] == ["0000.embed.bin"]


def test_racy_stamps_are_not_trusted(store, monkeypatch):
    """A block written within RACY_NS of being hashed is hashed again next time (a second write in the same
    clock tick would not change its stamp)."""
    hashed = count_hashes(monkeypatch)
    monkeypatch.setattr(verify, "RACY_NS", 10**18)
    zoedge.load(store).close()
    monkeypatch.setattr(verify, "_MEMORY", {})
    hashed.clear()
    zoedge.load(store).close()
    assert len(hashed) == len(load_manifest(store, verify=False).blocks)


def test_read_only_store_keeps_stamps_in_the_cache(store, monkeypatch, tmp_path):
    monkeypatch.setattr(verify, "RACY_NS", 0)
    real = verify.atomic_write_text

    def no_writes_in_store(path, text):
        if path.parent == store:
            raise PermissionError(13, "Permission denied")
        real(path, text)

    monkeypatch.setattr(verify, "atomic_write_text", no_writes_in_store)
    zoedge.load(store).close()
    assert not (store / verify.VERIFIED_NAME).exists()
    assert len(list((tmp_path / "cache" / "verified").glob("*.json"))) == 1
    hashed = count_hashes(monkeypatch)
    monkeypatch.setattr(verify, "_MEMORY", {})
    zoedge.load(store).close()
    assert hashed == []


def test_block_files_swapped_on_disk_are_refused(store):
    a, b = store / "blocks" / "0001.layers.0.bin", store / "blocks" / "0002.layers.1.bin"
    os.replace(a, store / "x")
    os.replace(b, a)
    os.replace(store / "x", b)
    refused(store, "is corrupt")


@pytest.mark.parametrize("swap", [("file",), ("file", "sha256")])
def test_block_files_swapped_in_the_manifest_are_refused(store, swap):
    def change(raw):
        x, y = block(raw, "layers.0"), block(raw, "layers.1")
        for key in swap:
            x[key], y[key] = y[key], x[key]
    edit_manifest(store, change)
    refused(store, "layers.")


# ------------------------------------------------------------------ manifest fields
def _parts(raw, name):
    return [p for b in raw["blocks"] for t in b["tensors"] if t["name"] == name for p in t["parts"].values()]


@pytest.mark.parametrize("case", ["shift", "overlap", "swap_same_size", "past_end", "misaligned"])
def test_bad_offsets_are_refused(store, case):
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"

    def change(raw):
        pq, po = _parts(raw, q)[0], _parts(raw, o)[0]
        if case == "shift":
            pq["offset"] += ALIGN
        elif case == "overlap":
            po["offset"] = pq["offset"]
        elif case == "swap_same_size":  # a consistent-looking layout that reads the wrong tensor
            pq["offset"], po["offset"] = po["offset"], pq["offset"]
        elif case == "past_end":
            po["offset"] = block(raw, "layers.0")["nbytes"]
        else:
            pq["offset"] += 4
    edit_manifest(store, change)
    msg = refused(store, str(store / MANIFEST_NAME), "layers.0")
    assert "Traceback" not in msg


@pytest.mark.parametrize("case", ["shape", "nbytes", "dtype", "tied_missing", "tied_wrong", "block_nbytes",
                                  "extra_tensor", "no_blocks", "wrong_type", "unknown_field", "version"])
def test_bad_manifest_fields_are_refused(store, case):
    def change(raw):
        t = block(raw, "layers.0")["tensors"][0]
        if case == "shape":
            t["shape"] = t["shape"][::-1] + [1]
        elif case == "nbytes":
            t["parts"]["data"]["nbytes"] += 4
        elif case == "dtype":
            t["dtype"] = t["parts"]["data"]["dtype"] = "fp16"
        elif case == "tied_missing":
            raw["tied"] = {}
        elif case == "tied_wrong":
            raw["tied"] = {"lm_head.weight": "model.norm.weight"}
        elif case == "block_nbytes":
            block(raw, "layers.0")["nbytes"] += ALIGN
        elif case == "extra_tensor":
            block(raw, "layers.0")["tensors"].append(dict(t, name="model.layers.0.extra.weight"))
        elif case == "no_blocks":
            raw["blocks"] = []
        elif case == "wrong_type":
            t["parts"]["data"]["offset"] = "0"
        elif case == "unknown_field":
            t["scale"] = 2.0
        else:
            raw["format_version"] = 99
    edit_manifest(store, change)
    culprit = store / "blocks" / "0001.layers.0.bin" if case == "block_nbytes" else store / MANIFEST_NAME
    refused(store, str(culprit), "Fix:")


@pytest.mark.parametrize("target", ["../../hf/model.safetensors", "/etc/hostname", "blocks/../../hf/model.safetensors",
                                    "blocks/../manifest.json", "blocks/"])
def test_manifest_paths_outside_the_store_are_refused(store, target):
    edit_manifest(store, lambda raw: block(raw, "layers.0").update(file=target))
    refused(store, "not a file under blocks/", "never reads outside")


def test_block_symlinks_are_refused_even_with_the_right_bytes(store, tmp_path):
    victim = store / "blocks" / "0001.layers.0.bin"
    outside = tmp_path / "elsewhere.bin"
    shutil.copyfile(victim, outside)
    victim.unlink()
    victim.symlink_to(outside)
    refused(store, "is a link")
    # a blocks/ directory that is itself a link out of the store
    victim.unlink()
    shutil.copyfile(outside, victim)
    shutil.move(store / "blocks", tmp_path / "blocks-elsewhere")
    (store / "blocks").symlink_to(tmp_path / "blocks-elsewhere")
    refused(store, "is a link")


def test_config_with_fewer_layers_than_the_store_is_refused(store):
    cfg = json.loads((store / "config.json").read_text())
    cfg["num_hidden_layers"] -= 1
    (store / "config.json").write_text(json.dumps(cfg))
    refused(store, "extra blocks ['layers.2']", "config.json")


def test_store_without_config_names_the_directory_and_file(store):
    (store / "config.json").unlink()
    refused(store, str(store), "has no config.json")


# ------------------------------------------------------------------ directories that are not stores
def test_store_without_manifest_says_what_the_directory_is(store, tmp_path):
    # (zoedge.load of a Hugging Face checkpoint prepares it into the cache: tests/test_generate.py)
    source = json.loads((store / MANIFEST_NAME).read_text())["source"]["source"]
    (store / MANIFEST_NAME).unlink()
    msg = refused(store, "unfinished zoedge block store", "zoedge prepare")
    assert f"`zoedge prepare {source} {store} --dtype fp32 --quant none`" in msg  # names the real source
    # --model of such a directory: the same error, not "no config.json (not a Hugging Face checkpoint)"
    (store / "config.json").unlink()
    with pytest.raises(StoreError, match="unfinished zoedge block store"):
        resolve_store(str(store), progress=False)


def test_missing_tokenizer_names_directory_and_files(store, tmp_path):
    for p in store.glob("tokenizer*"):
        p.unlink()
    with pytest.raises(StoreError, match=r"has no tokenizer \(none of tokenizer.json") as info:
        resolve_store(str(store), progress=False)
    assert str(store) in str(info.value)
    for p in (tmp_path / "hf").glob("tokenizer*"):
        p.unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        resolve_store(str(tmp_path / "hf"), progress=False)


def test_tokenizer_with_more_ids_than_the_embedding_is_refused(store, tmp_path):
    from transformers import AutoTokenizer

    from zoedge.train.job import load_tokenizer

    # the fixture's tokenizer has 300 ids, the tiny model's embedding 97 rows
    with pytest.raises(StoreError, match="has 300 ids but the model's embedding only 97 rows") as info:
        load_tokenizer(store)
    assert str(store) in str(info.value)
    small = AutoTokenizer.from_pretrained(store)
    assert len(small) == 300
    edit = json.loads((store / "config.json").read_text())
    edit["vocab_size"] = 300
    (store / "config.json").write_text(json.dumps(edit))
    assert len(load_tokenizer(store)) == 300  # as many rows as ids: accepted


def test_eval_cli_refuses_a_corrupt_store(store, capsys, monkeypatch):
    from transformers import AutoTokenizer
    from zoedge.train import job
    # this fixture's tokenizer has more ids than its tiny embedding (refused first, by design: data before the model);
    # take the tokenizer as it is, so that the corrupt block is what eval meets
    monkeypatch.setattr(job, "load_tokenizer", AutoTokenizer.from_pretrained)
    victim = store / "blocks" / "0003.layers.2.bin"
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0x40
    victim.write_bytes(bytes(raw))
    assert main(["eval", "--model", str(store), "--n-dev", "4", "--n-test", "4", "--n-train", "8",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is corrupt" in err and "Traceback" not in err


# ------------------------------------------------------------------ cached stores follow their source
def _resave(hf: Path, seed: int, keep_mtime: bool = False) -> dict[str, torch.Tensor]:
    path = hf / "model.safetensors"
    st = path.stat()
    weights = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    new = {k: torch.randn(v.shape, generator=g) for k, v in weights.items()}
    save_file(new, str(path), metadata={"format": "pt"})
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    return new


def _stored(store: Path) -> dict[str, torch.Tensor]:
    m = zoedge.load(store)
    try:
        return {k: v.clone() for k, v in m.state_dict().items()}
    finally:
        m.close()


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_cached_store_is_rebuilt_when_the_checkpoint_changes(store, tmp_path, keep_mtime):
    hf = tmp_path / "hf"
    first = resolve_store(str(hf), progress=False)
    assert first.parent == tmp_path / "cache" / "stores"
    old = _stored(first)
    new = _resave(hf, seed=5, keep_mtime=keep_mtime)
    second = resolve_store(str(hf), progress=False)
    assert second == first
    got = _stored(second)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[name], new[name]) and not torch.equal(got[name], old[name])
    assert not list((tmp_path / "cache" / "stores").glob("*.partial")) and \
        not list((tmp_path / "cache" / "stores").glob("*.deleting-*"))


def test_cached_store_unchanged_source_is_reused_without_hashing(store, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "RACY_NS", 0)
    hf = tmp_path / "hf"
    first = resolve_store(str(hf), progress=False)
    mtime = (first / MANIFEST_NAME).stat().st_mtime_ns
    hashed = []
    real_sha = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(p) or "x")
    assert resolve_store(str(hf), progress=False) == first
    assert hashed == [] and (first / MANIFEST_NAME).stat().st_mtime_ns == mtime
    # touched but identical: hashed, found equal, reused (not rebuilt)
    monkeypatch.undo()
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "RACY_NS", 0)
    os.utime(hf / "model.safetensors")
    hashed.clear()
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(p.name) or real_sha(p))
    assert resolve_store(str(hf), progress=False) == first
    assert (first / MANIFEST_NAME).stat().st_mtime_ns == mtime
    assert hashed == ["model.safetensors"]
    assert resolve_store(str(hf), progress=False) == first  # the new stamp was recorded: no hashing now
    assert hashed == ["model.safetensors"]
    # a new tokenizer/config file counts as a change
    (hf / "added_tokens.json").write_text("{}")
    resolve_store(str(hf), progress=False)
    assert (first / MANIFEST_NAME).stat().st_mtime_ns != mtime


def test_cache_list_and_prune(store, tmp_path, capsys):
    hf = tmp_path / "hf"
    kept = resolve_store(str(hf), progress=False)
    other = tmp_path / "other"
    shutil.copytree(hf, other)
    gone = resolve_store(str(other), progress=False)
    shutil.rmtree(other)
    leftover = kept.with_name(kept.name + ".deleting-123")  # as after a kill -9 during a rebuild
    shutil.copytree(kept, leftover)
    capsys.readouterr()
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "3 stores in " + str(tmp_path / "cache" / "stores") in out and "(source gone)" in out
    assert f"{leftover.name} (unfinished)" in out
    assert str(hf.resolve()) in out
    assert main(["cache", "prune"]) == 2  # no selection: refused
    assert main(["cache", "prune", "--unused", "--dry-run"]) == 0
    assert "would delete " + str(gone) in capsys.readouterr().out and gone.is_dir()
    assert main(["cache", "prune", "--unused"]) == 0
    assert not gone.exists() and not leftover.exists() and kept.is_dir()
    assert main(["cache", "prune", "--older-than", "1"]) == 0 and kept.is_dir()
    assert main(["cache", "prune", "--all"]) == 0 and not kept.exists()
    capsys.readouterr()
    assert main(["cache", "list", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []


# ------------------------------------------------------------------ prepare-side error texts
def test_checkpoint_with_more_layers_than_its_config_is_refused(tmp_path):
    save_tiny("llama", tmp_path / "hf", layers=3)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"not used by the model.*model\.layers\.2\.") as info:
        zoedge.prepare(tmp_path / "hf", tmp_path / "store", **QUIET)
    assert "num_hidden_layers" in str(info.value)
    assert not (tmp_path / "store").exists()


def test_integer_weight_text(tmp_path):
    save_tiny("llama", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    w = load_file(str(path))
    w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"].to(torch.int32)
    save_file(w, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        zoedge.prepare(tmp_path / "hf", tmp_path / "store", **QUIET)
    msg = str(info.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "int32" in msg
    assert "use an unquantized checkpoint" not in msg and "floating-point" in msg
    assert not (tmp_path / "store").exists()  # refused before anything is written


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_interrupted_cache_build_is_never_served_and_resumes(store, tmp_path, monkeypatch, keep_mtime):
    import zoedge.store.prepare as prep

    hf = tmp_path / "hf"
    real, calls = prep.atomic_write_bytes, []

    def dies_at_third_block(path, data):
        calls.append(path)
        if len(calls) == 5:  # block 0 + sidecar, block 1 + sidecar, then block 2
            raise KeyboardInterrupt
        real(path, data)

    with monkeypatch.context() as mp:
        mp.setattr(prep, "atomic_write_bytes", dies_at_third_block)
        with pytest.raises(KeyboardInterrupt):
            resolve_store(str(hf), progress=False)
    stores = tmp_path / "cache" / "stores"
    assert [p.name.endswith(".partial") for p in stores.iterdir() if p.is_dir()] == [True]
    got = resolve_store(str(hf), progress=False)  # resumes the partial build (same source)
    assert [p.name for p in stores.iterdir() if p.is_dir()] == [got.name]
    zoedge.load(got).close()

    # interrupted again, then the source changes: the partial build of the old source is discarded
    shutil.rmtree(got)
    calls.clear()
    with monkeypatch.context() as mp:
        mp.setattr(prep, "atomic_write_bytes", dies_at_third_block)
        with pytest.raises(KeyboardInterrupt):
            resolve_store(str(hf), progress=False)
    new = _resave(hf, seed=9, keep_mtime=keep_mtime)
    got = resolve_store(str(hf), progress=False)
    name = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(_stored(got)[name], new[name])
    assert torch.equal(_stored(got)["model.layers.0.mlp.up_proj.weight"], new["model.layers.0.mlp.up_proj.weight"])
