"""Just-in-time perturbations: range-addressable noise and the NoisePerturbed tensor (zoedge/runtime/perturbed.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoedge.noise.source import CHUNK, NoiseSource
from zoedge.plan.tracker import DeviceMemoryTracker
from zoedge.runtime.perturbed import NoisePerturbed, row_chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_ranges_are_the_whole_draw(dtype):
    """Any range of the chunked draw equals that part of the whole-tensor draw (normal_ on the CPU), across chunk
    boundaries and in the short last chunk."""
    noise = NoiseSource(3)
    total = 2 * CHUNK + 12345
    whole = noise.normal_(torch.empty(total, dtype=dtype), 5, "w", "z0")
    for start, n in [(0, 10), (CHUNK - 7, 20), (CHUNK, CHUNK), (2 * CHUNK + 100, 12245), (17, 2 * CHUNK)]:
        part = noise.normal_at_(torch.empty(n, dtype=dtype), 5, "w", "z0", start, total)
        assert torch.equal(part, whole[start:start + n]), (start, n)
    u = noise.uniform_(torch.empty(total, dtype=dtype), 5, "w", "sr")
    assert torch.equal(noise.uniform_at_(torch.empty(99, dtype=dtype), 5, "w", "sr", CHUNK - 50, total),
                       u[CHUNK - 50:CHUNK + 49])
    with pytest.raises(ValueError, match="outside"):
        noise.normal_at_(torch.empty(10), 5, "w", "z0", total - 5, total)


def _perturbed(base: torch.Tensor, chunk_bytes: int, alpha: float = 0.5) -> NoisePerturbed:
    noise = NoiseSource(1)
    return NoisePerturbed(base, lambda out, start, total: noise.normal_at_(out, 0, "t", "z0", start, total), alpha,
                          chunk_bytes)


def _reference(base: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    return torch.add(base, NoiseSource(1).normal(tuple(base.shape), 0, "t", "z0"), alpha=alpha)


def test_linear_and_embedding_in_row_chunks_equal_the_whole_perturbed_weight():
    """Every row chunk holds exactly the rows of the weight formed whole (θ + αz with the whole draw); F.embedding
    chunk by chunk gives the same numbers; F.linear over chunks of output rows the same up to the matrix
    product's rounding (a BLAS kernel may block the reduction differently for fewer output columns), and
    exactly the same when the weight fits one chunk; other ops see the whole tensor; shape queries form nothing."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 64, generator=g), torch.randn(300, generator=g)
    x, ids = torch.randn(5, 7, 64, generator=g), torch.randint(0, 300, (4, 9), generator=g)
    ref_w, ref_b = _reference(w), _reference(b)
    for chunk in (64 * 4 * 7, 10**9):  # 7 rows per chunk (the last one shorter), then one piece
        pw, pb = _perturbed(w, chunk), _perturbed(b, chunk)
        assert (len(pw.chunks()) > 1) == (chunk < 10**9)
        for a, z in pw.chunks():
            assert torch.equal(pw.rows(a, z), ref_w[a:z]) and torch.equal(pb.rows(a, z), ref_b[a:z])
        same = torch.equal if len(pw.chunks()) == 1 else lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-5)
        assert same(F.linear(x, pw, pb), F.linear(x, ref_w, ref_b))
        assert same(F.linear(x, pw, b), F.linear(x, ref_w, b))
        assert torch.equal(F.embedding(ids, pw), F.embedding(ids, ref_w))
        assert torch.equal(pw * 2, ref_w * 2) and torch.equal(F.layer_norm(x, (64,), pb[:64], None),
                                                              F.layer_norm(x, (64,), ref_b[:64], None))
    assert pw.data_ptr() == w.data_ptr() and pw.shape == w.shape and pw.dtype == w.dtype


def test_a_chunk_is_the_only_weight_sized_buffer():
    """Device bytes (meta, counted by the tracker): a chunked F.linear holds one row chunk of the perturbed weight
    (plus its output; plus at most one noise chunk where a row chunk cuts one), never the whole perturbed matrix."""
    w = torch.empty(8192, 1024, device="meta")
    x = torch.empty(2, 1024, device="meta")
    out = 2 * 8192 * 4
    for chunk, extra in ((8 * 2**20, 0), (2**20, CHUNK * 4)):  # 2048 rows (whole noise chunks), 256 rows (cut)
        with DeviceMemoryTracker("meta") as tr:
            F.linear(x, _perturbed(w, chunk))
        assert chunk <= tr.peak <= chunk + extra + 2 * out, chunk
    with DeviceMemoryTracker("meta") as whole:
        F.linear(x, _perturbed(w, 10**12))
    assert whole.peak >= 8192 * 1024 * 4


def test_row_chunks_cover_every_row_once():
    assert list(row_chunks((10, 3), 4, 24)) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert list(row_chunks((3000, 1024), 2, 3 * 2**20)) == [(0, 1024), (1024, 2048), (2048, 3000)]  # noise-aligned
    assert list(row_chunks((10,), 4, 1)) == [(a, a + 1) for a in range(10)]  # at least one row per chunk
    assert list(row_chunks((10, 3), 4, 10**6)) == [(0, 10)]
