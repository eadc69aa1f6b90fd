"""Hostile input: thousands of seeded random mutations of a valid safetensors header and of a valid store manifest.

Every mutation must end in a clean zoedge error or a valid parse -- never another exception type, a hang, a
large allocation, or (for the manifest) a store accepted that would hand the runtime other bytes than the
original. Mutations: byte flips, insertions, deletions, truncations, the length prefix, and JSON-level edits
(numbers nudged or replaced by extreme values and other types, strings changed, keys dropped or added, list
items removed, duplicated or swapped, deep nesting).
"""
from __future__ import annotations

import copy
import json
import random
import resource
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import zoedge
import zoedge.store.verify as verify
from zoedge.errors import CheckpointError, StoreError
from zoedge.store.manifest import MANIFEST_NAME, load_manifest
from zoedge.store.safetensors_io import read_header, read_tensor
from tests.tiny import save_tiny

N_HEADER, N_MANIFEST = 2500, 2000
MAX_CASE_S = 2.0  # a hang, or a quadratic blow-up, shows as one slow case
MAX_RSS_GROWTH = 300 * 2**20

EXTREMES = [0, 1, -1, 255, 256, 2**31, 2**32 + 7, 2**63 - 1, 2**63, 2**64 + 1, 10**30, -(10**30), 0.5, 1e308,
            float("nan"), True, False, None, "", "0", "F32", "../x", "/etc/hostname", [], {}, [1, 2], {"a": 1}]


# ------------------------------------------------------------------ mutation engine
def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(node: Any, path: tuple) -> Any:
    for k in path:
        node = node[k]
    return node


def mutate_json(doc: Any, rng: random.Random) -> Any:
    """One random structural or value edit of a JSON document (a copy)."""
    doc = copy.deepcopy(doc)
    path = rng.choice(_paths(doc)[1:])
    parent, key = _get(doc, path[:-1]), path[-1]
    value = parent[key]
    op = rng.randrange(9)
    if op == 0 and isinstance(value, int) and not isinstance(value, bool):
        parent[key] = value + rng.choice([-4096, -256, -8, -1, 1, 2, 4, 8, 256, 4096])
    elif op == 1:
        parent[key] = rng.choice(EXTREMES)
    elif op == 2 and isinstance(value, str) and value:
        i = rng.randrange(len(value))
        parent[key] = value[:i] + rng.choice("aZ0./_- \u00e9\x00") + value[i + 1:]
    elif op == 3 and isinstance(parent, dict):
        del parent[key]
    elif op == 4 and isinstance(parent, dict):
        parent[rng.choice(["extra", "__metadata__", "dtype", "x" * 50, ""])] = rng.choice(EXTREMES)
    elif op == 5 and isinstance(value, list) and value:
        value.pop(rng.randrange(len(value)))
    elif op == 6 and isinstance(value, list) and value:
        value.insert(rng.randrange(len(value) + 1), copy.deepcopy(rng.choice(value)))
    elif op == 7 and isinstance(value, list) and len(value) > 1:
        i, j = rng.sample(range(len(value)), 2)
        value[i], value[j] = value[j], value[i]
    elif op == 8 and isinstance(parent, dict) and len(parent) > 1:
        other = rng.choice([k for k in parent if k != key])  # swap two fields' values
        parent[key], parent[other] = parent[other], parent[key]
    else:
        parent[key] = rng.choice(EXTREMES)
    return doc


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    op = rng.randrange(5)
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= rng.randint(1, 255)
    elif op == 1:
        del b[rng.randrange(len(b)):]
    elif op == 2:
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == 3:
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 16)]
    else:
        i = rng.randrange(len(b))
        b[i:i] = rng.choice([b"[" * 50000, b'{"a":' * 30000, b"1" * 5000, b"\xff\xfe", b'"\\ud800"'])
    return bytes(b)


class Budget:
    """Fails on a slow case and on memory growth over the whole run."""

    def __init__(self) -> None:
        self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.slowest = 0.0

    def case(self, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            dt = time.perf_counter() - t0
            self.slowest = max(self.slowest, dt)
            assert dt < MAX_CASE_S, f"a case took {dt:.1f} s"

    def check(self) -> None:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss0
        assert grown < MAX_RSS_GROWTH, f"peak RSS grew by {grown / 2**20:.0f} MiB"


# ------------------------------------------------------------------ safetensors headers
@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(4, 8, generator=g), "b": torch.randn(3, generator=g).half(),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "d": torch.randn(5, generator=g).bfloat16(),
               "empty": torch.zeros(0, 4)}, str(path), metadata={"format": "pt"})
    return path


def test_mutated_safetensors_headers(safetensors_file, tmp_path):
    raw = safetensors_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    rng = random.Random(1234)
    budget, outcomes = Budget(), {"error": 0, "parsed": 0}
    target = tmp_path / "model.safetensors"
    for i in range(N_HEADER):
        kind = rng.randrange(3)
        if kind == 0:  # structural edit, consistent length prefix
            text = json.dumps(mutate_json(header, rng)).encode()
            blob = struct.pack("<Q", len(text)) + text + data
        elif kind == 1:  # raw bytes of prefix + header (data intact)
            blob = mutate_bytes(raw[:8 + n], rng) + data
        else:  # the length prefix itself
            blob = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, n + 8, len(raw), 2**40, 2**64 - 1])) + raw[8:]
        target.write_bytes(blob)

        def one() -> str:
            try:
                st = read_header(target)
                for info in st.tensors.values():
                    assert 8 + st.header_size <= info.start <= info.end <= len(blob)
                    t = read_tensor(info, target)
                    assert t.shape == info.shape
                return "parsed"
            except CheckpointError as e:
                assert str(target) in str(e) and "Fix:" in str(e)
                return "error"

        outcomes[budget.case(one)] += 1
    budget.check()
    print(outcomes, f"slowest case {budget.slowest:.3f} s")
    assert outcomes["error"] > N_HEADER // 2 and outcomes["parsed"] > 20, outcomes


# ------------------------------------------------------------------ manifests
@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    save_tiny("llama", root / "hf", layers=2)
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return root / "store"


def test_mutated_manifests(fuzz_store, monkeypatch):
    monkeypatch.setattr(verify, "RACY_NS", 0)
    path = fuzz_store / MANIFEST_NAME
    raw = path.read_bytes()
    original = load_manifest(fuzz_store)
    doc = json.loads(raw)
    rng = random.Random(4321)
    budget, outcomes = Budget(), {"error": 0, "accepted": 0}
    try:
        for i in range(N_MANIFEST):
            if rng.random() < 0.7:
                text = json.dumps(mutate_json(doc, rng), indent=rng.choice([None, 1])).encode()
            else:
                text = mutate_bytes(raw, rng)
            path.write_bytes(text)

            def one() -> str:
                try:
                    m = load_manifest(fuzz_store)
                except StoreError as e:
                    assert "Fix:" in str(e)
                    return "error"
                # Accepted: it must describe exactly the bytes the original did (only free text may differ).
                assert [(b.name, b.file, b.nbytes, b.sha256, b.tensors) for b in m.blocks] == \
                       [(b.name, b.file, b.nbytes, b.sha256, b.tensors) for b in original.blocks]
                assert (m.tied, m.dtype, m.quant, m.family) == \
                       (original.tied, original.dtype, original.quant, original.family)
                return "accepted"

            outcomes[budget.case(one)] += 1
    finally:
        path.write_bytes(raw)
    budget.check()
    print(outcomes, f"slowest case {budget.slowest:.3f} s")
    assert outcomes["error"] > N_MANIFEST * 0.8, outcomes
    load_manifest(fuzz_store)  # the store itself was never damaged by the checks
