"""Quantized tensors expanded just in time: the Dequantized view, streamed int8/nf4 forwards and HZO steps against
the whole-tensor dequantisation, slots that hold the stored bytes only."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoedge
from tests.tiny import batch, save_tiny
from zoedge.errors import ConfigError
from zoedge.optim.lowrank import LowRankPerturbed
from zoedge.optim.registry import build
from zoedge.plan.accounting import synthetic_batch
from zoedge.plan.tracker import DeviceMemoryTracker
from zoedge.runtime import run_loop as streamed
from zoedge.runtime.dequantized import Dequantized
from zoedge.memory import ALLOCATIONS
from zoedge.store import quant as q
from zoedge.store.manifest import load_manifest
from zoedge.train.trainer import _loss_passes


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("dq")
    out = {}
    for family, tie in (("opt", True), ("llama", False)):
        save_tiny(family, root / family, layers=3, tie=tie)
        for kind in ("int8", "nf4"):
            out[family, kind] = root / f"{family}-{kind}"
            zoedge.prepare(root / family, out[family, kind], dtype="fp32", quant=kind, progress=False,
                           log=lambda s: None)
    return out


def _matrix(kind: str, shape=(48, 80), dtype=torch.float32, chunk_bytes=1 << 26):
    g = torch.Generator().manual_seed(0)
    parts = q.quantize(torch.randn(shape, generator=g), kind, q.DEFAULT_BLOCKSIZE[kind])
    whole = q.dequantize(kind, parts, shape, dtype, q.DEFAULT_BLOCKSIZE[kind])
    return Dequantized(kind, parts, shape, dtype, q.DEFAULT_BLOCKSIZE[kind], chunk_bytes, "w"), whole


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_dequantized_view_forms_values_at_the_op(kind):
    w, whole = _matrix(kind)
    x, bias = torch.randn(3, 5, 80), torch.randn(48)
    assert w.shape == whole.shape and w.dtype == whole.dtype and w.ndim == 2
    assert torch.equal(F.linear(x, w, bias), F.linear(x, whole, bias))         # one piece: the unchunked op
    ids = torch.tensor([[0, 47, 3], [12, 12, 30]])
    assert torch.equal(F.embedding(ids, w), F.embedding(ids, whole))
    assert torch.equal(w * 2, whole * 2) and torch.equal(w.T @ torch.ones(48), whole.T @ torch.ones(48))
    small, _ = _matrix(kind, chunk_bytes=1024)                                  # 4 rows of 80 fp32 per chunk
    assert len(small.chunks()) > 1
    torch.testing.assert_close(F.linear(x, small, bias), F.linear(x, whole, bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(F.embedding(ids, small), F.embedding(ids, whole))        # gathers are exact
    lr = LowRankPerturbed(w, torch.randn(48, 2), torch.randn(80, 2), 0.5)     # a low-rank view over it
    ref = LowRankPerturbed(whole, lr.u, lr.v, 0.5)
    assert torch.equal(F.linear(x, lr, bias), F.linear(x, ref, bias))
    with pytest.raises(ConfigError, match="stored quantized"):
        w.add_(1.0)
    with pytest.raises(ConfigError, match="stored quantized"):
        w.copy_(whole)
    with torch._C.DisableTorchFunctionSubclass():                              # its own storage is a NaN
        assert torch.isnan(F.linear(x, w)).all()


class Materialized(zoedge.BlockVisitor):
    """The whole-unit dequantisation zoedge did before: every quantized tensor of a block expanded whole before
    its passes."""

    def pass_tensors(self, block, p):
        return {k: v.materialize() if isinstance(v, Dequantized) else v for k, v in block.tensors.items()}


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_streamed_quantized_logits_equal_whole_unit_dequantisation(stores, family, kind):
    ids, mask = batch()
    for kw in ({}, {"in_place": False}, {"in_place": False, "unit": "half"} if family == "opt" else None):
        if kw is None:
            continue
        m = zoedge.load(stores[family, kind], **kw)
        got = m(ids, mask)
        assert torch.equal(got, m.run(Materialized(), ids, mask)[0]), kw
        m.close()
    chunked = zoedge.load(stores[family, kind], in_place=False, chunk_bytes=512)  # row chunks of every matrix
    torch.testing.assert_close(chunked(ids, mask), got, rtol=0, atol=1e-5)
    chunked.close()


def _hzo_steps(store: Path, steps: int = 3, **kw) -> tuple[list[float], dict[str, torch.Tensor]]:
    m = zoedge.load(store, in_place=False, **kw)
    opt = build("hzo", {"nu": 100, "lr": 1e-2, "eps": 1e-2}, seed=5)
    b = synthetic_batch(m.config.vocab_size, 2, 8, 5, seed=1)
    losses = []
    for t in range(steps):
        opt.begin_step(t)
        values = [loss.float() for loss, _ in _loss_passes(m, opt, b)]
        opt.finish_step(values)
        losses += [float(v) for v in values]
    m.close()
    return losses, {**opt.a, **{f"d:{k}": v for k, v in opt.d.items()}}


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_hzo_factor_steps_on_a_quantized_store_equal_whole_unit_dequantisation(stores, family, kind, monkeypatch):
    """HZO's factor mode on an int8 / nf4 store (the base product from the matrix expanded at its op, the low-rank
    term beside it) takes the same steps, bit for bit, as with every quantized tensor expanded whole first."""
    losses, state = _hzo_steps(stores[family, kind])
    bind = streamed.bind

    def whole(slot, i, block, chunk_bytes):
        return {k: v.materialize() if isinstance(v, Dequantized) else v for k, v in bind(slot, i, block, chunk_bytes).items()}

    monkeypatch.setattr(streamed, "bind", whole)
    ref_losses, ref_state = _hzo_steps(stores[family, kind])
    assert losses == ref_losses and len(set(losses)) > 1
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    quantized = [t.name for b in load_manifest(stores[family, kind]).blocks for t in b.tensors if t.quant != "none"]
    assert quantized and all(n in state for n in quantized)  # the quantized matrices are trained (their factors)


def test_dense_methods_are_refused_on_a_quantized_store(stores):
    m = zoedge.load(stores["opt", "nf4"], in_place=False)
    opt = build("mezo", {}, seed=0)
    opt.begin_step(0)
    with pytest.raises(ConfigError, match="stored quantized"):
        _loss_passes(m, opt, synthetic_batch(m.config.vocab_size, 1, 8))
    m.close()


class LargestStorage(DeviceMemoryTracker):
    """The tracker, also recording the largest single storage allocated."""

    largest = 0

    def add(self, t):
        if t.device.type == self.device_type:
            self.largest = max(self.largest, t.untyped_storage().nbytes())
        super().add(t)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_slots_hold_the_stored_bytes_and_no_unit_sized_dequantisation(stores, kind):
    """The allocation log of a quantized run through slots: the ring and the tied-weight slot hold the stored
    (quantized) bytes only; no buffer of a unit's dequantized size is ever allocated (with 1 KiB chunks, no
    buffer even of one matrix)."""
    man = load_manifest(stores["opt", kind])
    before = dict(ALLOCATIONS.nbytes)
    m = zoedge.load(stores["opt", kind], in_place=False, prefetch=1, chunk_bytes=1024)
    slots = ALLOCATIONS.nbytes["slot"] - before.get("slot", 0)
    owner = 0  # OPT ties the head to the embedding: the embed block keeps a dedicated slot
    assert slots == man.blocks[owner].nbytes + 2 * max(b.nbytes for b in man.blocks[1:])
    ids = torch.tensor([[5, 7]])  # two tokens: every activation is smaller than a weight matrix
    with LargestStorage("cpu") as tr:
        m(ids)
    layer = man.blocks[1]
    matrices = [t.numel * 4 for t in layer.tensors if t.quant != "none"]
    assert tr.largest <= 1024 < min(matrices) < layer.dequant_nbytes
    assert ALLOCATIONS.nbytes["slot"] - before.get("slot", 0) == slots  # nothing more allocated by the run
    m.close()
    m = zoedge.load(stores["opt", kind], in_place=False)  # default chunks: one whole matrix at a time, not a unit
    with LargestStorage("cpu") as tr:
        m(ids)
    assert tr.largest == max(matrices) < layer.dequant_nbytes
    m.close()


def test_low_rank_view_forms_a_perturbed_bias_at_its_op(tmp_path):
    """The low-rank base product runs with subclass dispatch on, so a bias formed at the op (HZO's dense
    perturbation of 1-D tensors, lean on a GPU) is perturbed: lean HZO through slots takes the same steps as the
    workspace mode bound in place (before, the lean run read the unperturbed bias under the low-rank weight)."""
    save_tiny("opt", tmp_path / "hf", layers=2)
    zoedge.prepare(tmp_path / "hf", tmp_path / "store", dtype="fp32", progress=False, log=lambda s: None)

    def steps(**kw):
        m = zoedge.load(tmp_path / "store", **kw)
        assert m.lean == (not m.in_place)
        opt = build("hzo", {"nu": 100, "lr": 1e-2, "eps": 1e-2}, seed=5)
        b = synthetic_batch(m.config.vocab_size, 2, 8, 5, seed=1)
        out = []
        for t in range(2):
            opt.begin_step(t)
            values = [loss.float() for loss, _ in _loss_passes(m, opt, b)]
            opt.finish_step(values)
            out += [float(v) for v in values]
        m.close()
        return out

    assert steps() == steps(in_place=False)
