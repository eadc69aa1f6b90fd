"""Store verification's stamps, driven directly (zoedge/store/verify.py): ``verify_blocks`` returns how many blocks
it hashed (all on a first load, none once stamped, only a touched one after that), and a stamp file it cannot
trust (another format, or damaged) only means hashing again, never trusting it or failing."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from zoedge.store import verify
from zoedge.store.verify import VERIFIED_NAME, verify_blocks

OLD = 1_600_000_000  # an mtime of 2020


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "_MEMORY", {})  # this process's memory of verified blocks: start empty
    monkeypatch.setattr(verify, "RACY_NS", 0)  # files just written are stamped (no racy window: ctime is now)
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    for i in range(3):
        f = tmp_path / f"block-{i}.bin"
        f.write_bytes(bytes([i]) * 100)
        os.utime(f, (OLD, OLD))
    return tmp_path


def blocks(store):
    return [(f"b{i}", hashlib.sha256((store / f"block-{i}.bin").read_bytes()).hexdigest(), store / f"block-{i}.bin")
            for i in range(3)]


def test_counts_the_blocks_it_hashed(store):
    assert verify_blocks(store, blocks(store)) == 3
    assert (store / VERIFIED_NAME).exists()
    verify._MEMORY.clear()  # a new process: only the stamp file remains
    assert verify_blocks(store, blocks(store)) == 0
    os.utime(store / "block-1.bin", (OLD + 5, OLD + 5))  # touched (same bytes): hashed again, alone
    verify._MEMORY.clear()
    assert verify_blocks(store, blocks(store)) == 1


@pytest.mark.parametrize("text", [
    "another format: {}",  # replaced below by a stamp file of format 2 with valid-looking stamps
    '{"format": 1, "blocks": ["b0", "b1"]}',
    '{"format": 1}',
    "not json",
])
def test_untrusted_stamp_files_mean_hashing_again(store, text):
    verify_blocks(store, blocks(store))
    if text.startswith("another format"):
        good = json.loads((store / VERIFIED_NAME).read_text())
        text = json.dumps({**good, "format": 2})
    (store / VERIFIED_NAME).write_text(text)
    verify._MEMORY.clear()
    assert verify_blocks(store, blocks(store)) == 3
