"""CUDA: streamed == resident, slot reuse without allocations, and stream/event ordering.

All tests carry the ``gpu`` marker (skipped by conftest when CUDA is absent).

Tolerances (streamed vs the resident transformers model on the same GPU, same dtype; both run the same
modules, so the same kernels on the same shapes, and equality is expected; the bounds leave room for a
different GEMM algorithm only): fp32 |Δ| ≤ 1e-4 (TF32 is off by default for matmuls); fp16
|Δ| ≤ 1e-4 + 2e-3·|ref| (about 2 fp16 ulps; the tiny models' logits are ≤ ~0.74). The streamed output must
also *be* fp16 (a silent fp32 fallback would pass a tolerance this loose: fp16 and fp32 logits of the tiny
Llama differ by ≤ ~4e-4).

The ordering tests make races observable instead of hoping for them: ``torch.cuda._sleep`` (a spin kernel)
delays one stream (through the accelerator engine's per-queue ``hooks``) so that a missing wait would let
another stream read or overwrite a buffer too early, which changes the logits:

* delayed uploads → compute must wait for the upload into its slot; the disk tier's I/O thread must wait
  for the H2D copy out of a ring buffer before reading the next block into it;
* delayed compute → the next upload into a slot must wait for the compute that read it;
* delayed write-backs → the next upload of a dirty block must wait for its D2H.

The same scenarios run on the CPU in ``tests/test_engines.py`` (simulated interleavings, every wait removed
in turn); these tests check the accelerator engine itself on a real device.
"""
from __future__ import annotations

import pytest
import torch

import zoedge
from tests.tiny import batch, resident_logits, save_tiny
from zoedge.memory import ALLOCATIONS
from zoedge.runtime.schedule import COMPUTE, OFFLOAD, UPLOAD

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOL = {"fp32": (0.0, 1e-4), "fp16": (2e-3, 1e-4)}  # (rtol, atol)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
SLEEP = 2_000_000  # spin-kernel cycles (~1 ms): much longer than any tiny-model kernel or copy


@pytest.fixture(scope="module", params=[(f, d) for f in ("llama", "opt") for d in ("fp32", "fp16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def store(request, tmp_path_factory):
    """(family, dtype, resident model on the GPU in that dtype, store path)."""
    family, dtype = request.param
    root = tmp_path_factory.mktemp(f"{family}-{dtype}")
    model = save_tiny(family, root / "hf")
    zoedge.prepare(root / "hf", root / "store", dtype=dtype, progress=False, log=lambda s: None)
    return family, dtype, model.to(DEV, DTYPES[dtype]).eval(), root / "store"


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """A fp32 tiny Llama (tied embeddings) on the GPU and its store, for the ordering tests."""
    root = tmp_path_factory.mktemp("llama32")
    model = save_tiny("llama", root / "hf")
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return model.to(DEV).eval(), root / "store"


def _inputs():
    ids, mask = batch()
    return ids.to(DEV), mask.to(DEV)


def _close(got: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float]) -> None:
    assert got.device.type == "cuda"
    rtol, atol = tol
    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("tier", ["ram", "disk"])
@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_streamed_equals_resident_cuda(store, tier, prefetch):
    family, dtype, model, path = store
    ids, mask = _inputs()
    ref = resident_logits(model, ids, mask)
    m = zoedge.load(path, device=DEV, tier=tier, prefetch=prefetch)
    try:
        for _ in range(2):  # the second forward reuses every slot and event
            got = m(ids, mask)
            assert got.dtype == DTYPES[dtype]
            _close(got, ref, TOL[dtype])
        sel = torch.tensor([5, 9, 26], device=DEV)
        _close(m(ids, mask, select=sel), ref.reshape(-1, ref.shape[-1])[sel], TOL[dtype])
    finally:
        m.close()


def test_host_buffers_are_pinned(llama32):
    _, path = llama32
    for tier in ("ram", "disk"):
        m = zoedge.load(path, device=DEV, tier=tier, prefetch=2)
        try:
            bufs = m.tier.buffers if tier == "ram" else m.tier.ring
            assert all(b.is_pinned() for b in bufs), f"{tier}: pageable host buffers make H2D copies synchronous"
            assert all(s.raw.device.type == "cuda" for s in [*m.ring, *m.dedicated.values()])
        finally:
            m.close()


# ---------------------------------------------------------------------------------------- slot reuse
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_no_allocation_after_first_forward_cuda(llama32, tier):
    """Slots, ring and workspaces are reused: after the first forwards, neither the runtime nor the caching
    allocator allocates anything, and the allocated bytes return to the same value after every forward."""
    model, path = llama32
    ids, mask = _inputs()
    ref = resident_logits(model, ids, mask)
    m = zoedge.load(path, device=DEV, tier=tier, prefetch=2)

    def step() -> None:  # the same work every iteration, checks included (they allocate temporaries too)
        out = m(ids, mask)
        _close(out, ref, TOL["fp32"])
        del out
        m.synchronize()

    try:
        step()  # the first forward creates the runtime's lazily allocated buffers (workspaces)
        runtime = ALLOCATIONS.snapshot()
        step()  # the caching allocator has seen the whole pattern of temporaries once more
        assert ALLOCATIONS.snapshot() == runtime, "the runtime allocated a buffer after the first forward"
        retries = torch.cuda.memory_stats(DEV)["num_alloc_retries"]
        allocated, reserved = torch.cuda.memory_allocated(DEV), torch.cuda.memory_reserved(DEV)
        for _ in range(3):
            step()
            assert ALLOCATIONS.snapshot() == runtime, "the runtime allocated a buffer after the first forward"
            assert torch.cuda.memory_stats(DEV)["num_alloc_retries"] == retries
            assert torch.cuda.memory_allocated(DEV) == allocated, "allocated bytes did not return to the same value"
            assert torch.cuda.memory_reserved(DEV) == reserved, "the caching allocator had to reserve more memory"
    finally:
        m.close()


# ------------------------------------------------------------------------------------ streams & events
def test_streams_are_distinct(llama32):
    _, path = llama32
    m = zoedge.load(path, device=DEV)
    try:
        streams = m.engine.streams
        handles = {streams[q].stream_id for q in (UPLOAD, COMPUTE, OFFLOAD)}
        assert len(handles) == 3, "upload, compute and offload must be three different streams"
        assert streams[COMPUTE].stream_id == torch.accelerator.current_stream(DEV).stream_id
        ops = m.schedule.record()
        ids, mask = _inputs()
        m(ids, mask)
        device_ops = [op for op in ops if op.queue != "io"]
        assert device_ops and all(isinstance(op.done, torch.Event) for op in device_ops if not op.skipped)
        assert any(op.waits for op in device_ops), "device operations must wait for each other through events"
    finally:
        m.close()


def _delay_uploads(m: zoedge.StreamedModel) -> None:
    """Enqueue a spin kernel on the upload stream before every H2D copy (the copy runs ~1 ms late)."""
    m.engine.hooks[UPLOAD] = lambda: torch.cuda._sleep(SLEEP)


class _SlowCompute(zoedge.BlockVisitor):
    """Delays the compute stream at every residency: uploads that do not wait for ``slot.free`` overwrite
    a slot before its block has run."""

    def on_resident(self, block):
        torch.cuda._sleep(SLEEP)  # on_resident runs on the compute stream


@pytest.mark.parametrize("tier", ["ram", "disk"])
@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_delayed_uploads_are_waited_for(llama32, tier, prefetch):
    model, path = llama32
    ids, mask = _inputs()
    ref = resident_logits(model, ids, mask)
    m = zoedge.load(path, device=DEV, tier=tier, prefetch=prefetch)
    try:
        _delay_uploads(m)
        for _ in range(2):
            _close(m(ids, mask), ref, TOL["fp32"])
    finally:
        m.close()


@pytest.mark.parametrize("tier", ["ram", "disk"])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_delayed_compute_keeps_slots(llama32, tier, prefetch):
    model, path = llama32
    ids, mask = _inputs()
    ref = resident_logits(model, ids, mask)
    m = zoedge.load(path, device=DEV, tier=tier, prefetch=prefetch)
    try:
        for _ in range(2):
            _close(m.run(_SlowCompute(), ids, mask)[0], ref, TOL["fp32"])
    finally:
        m.close()


def test_host_buffers_modified_right_after_run(llama32):
    """After ``run`` returns and ``synchronize()``, every H2D copy is done: trashing the host copy of the
    model cannot change logits already computed, and the next forward sees the new host bytes."""
    model, path = llama32
    ids, mask = _inputs()
    ref = resident_logits(model, ids, mask)
    m = zoedge.load(path, device=DEV, tier="ram", prefetch=2)
    try:
        _delay_uploads(m)  # copies are still queued when run() returns
        out = m(ids, mask)
        m.synchronize()
        saved = [b.clone() for b in m.tier.buffers]
        for b in m.tier.buffers:
            b.zero_()
        _close(out, ref, TOL["fp32"])
        zeros = m(ids, mask)  # all-zero weights: every logit is 0
        m.synchronize()
        assert torch.count_nonzero(zeros) == 0
        for b, s in zip(m.tier.buffers, saved):
            b.copy_(s)
        _close(m(ids, mask), ref, TOL["fp32"])
    finally:
        m.close()


class _Scale(zoedge.BlockVisitor):
    """A dense in-place update: scales layer 1's tensors by ``factor`` and marks the block dirty."""

    def __init__(self, factor: float, delay_compute: bool = False) -> None:
        self.factor, self.delay = factor, delay_compute

    def on_resident(self, block):
        if self.delay:
            torch.cuda._sleep(SLEEP)
        if block.name == "layers.1":
            for t in block.tensors.values():
                t.mul_(self.factor)
            block.mark_dirty()


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_dense_writeback_ordering(llama32, tier, tmp_path):
    """Write-backs delayed on the offload stream: the next upload of the dirty block must wait for its D2H
    (``host_ready``), and the disk tier must persist what the D2H wrote."""
    model, path = llama32
    ids, mask = _inputs()
    kwargs = {"working_dir": tmp_path / "work"} if tier == "disk" else {}
    m = zoedge.load(path, device=DEV, tier=tier, prefetch=2, **kwargs)
    try:
        m.engine.hooks[OFFLOAD] = lambda: torch.cuda._sleep(SLEEP)  # every D2H runs ~1 ms late
        out = m.run(_Scale(2.0, delay_compute=True), ids, mask)[0]
        # the pass saw the scaled weights (the update is applied before the passes)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.startswith("model.layers.1."):
                    p.mul_(2.0)
        ref2 = resident_logits(model, ids, mask)
        _close(out, ref2, TOL["fp32"])
        # the next forward re-uploads layer 1 from the host tier: it must see the written-back weights
        _close(m(ids, mask), ref2, TOL["fp32"])
        # and again scaled back, then a plain forward equals the original model
        m.run(_Scale(0.5), ids, mask)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.startswith("model.layers.1."):
                    p.mul_(0.5)
        _close(m(ids, mask), resident_logits(model, ids, mask), TOL["fp32"])
        sd = m.state_dict()
        for n, p in model.state_dict().items():
            torch.testing.assert_close(sd[n], p.cpu(), rtol=0, atol=1e-6)
    finally:
        m.close()
