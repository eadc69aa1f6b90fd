"""Counter-based noise in chunks: each chunk's values are a pure function of (seed, step, tensor, stream, chunk),
so a draw is bit-identical whatever the number of threads that fills it."""
from __future__ import annotations

import pytest
import torch

from zoedge.noise import source as nz
from zoedge.noise import philox


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


SHAPE = (7, nz.CHUNK // 2 + 3)  # 3.5 chunks and a ragged tail


@pytest.mark.parametrize("generator", nz.GENERATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_values_with_1_2_and_4_threads(restore_threads, monkeypatch, dtype, generator):
    on_torch_threads = generator == "philox" and dtype == torch.float32 and philox.parallel()
    used = []
    fill_many = philox.fill_many
    monkeypatch.setattr(philox, "fill_many", lambda pieces, threads: (used.append(threads), fill_many(pieces, threads)))
    draws = {}
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        src = nz.NoiseSource(5, generator)
        draws[threads] = (src.normal_(torch.empty(SHAPE, dtype=dtype), 3, "layers.0.w", "z0"),
                          src.uniform_(torch.empty(SHAPE, dtype=dtype), 3, "layers.0.w", "sr"))
        if on_torch_threads:  # the kernel's pieces, on torch's OpenMP threads
            assert used[-2:] == [threads, threads]
        elif threads > 1:
            assert nz._CHUNKS.workers >= threads - 1  # the chunks were drawn on the calling thread and a pool
    for threads in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(draws[1], draws[threads])), threads


def test_philox_value_i_is_word_i_of_the_stream_seeds_philox_stream(restore_threads):
    torch.set_num_threads(2)
    src = nz.NoiseSource(5)
    assert src.generator == "philox"  # the default
    out = src.normal_(torch.empty(SHAPE), 3, "w", "z0").view(-1)
    seed = nz.stream_seed(5, 3, "w", "z0")
    start = nz.CHUNK - 1000  # a range across a chunk boundary, computed on its own
    assert torch.equal(out[start:start + 3000], philox.reference_fill_(torch.empty(3000), seed, start))
    u = src.uniform_(torch.empty(SHAPE), 3, "w", "sr").view(-1)
    sr = nz.stream_seed(5, 3, "w", "sr")
    assert torch.equal(u[-777:], philox.reference_fill_(torch.empty(777), sr, u.numel() - 777, "uniform"))
    # and a bf16 target holds the fp32 values rounded
    half = src.normal_(torch.empty(SHAPE, dtype=torch.bfloat16), 3, "w", "z0").view(-1)
    assert torch.equal(half, out.to(torch.bfloat16))


def test_mt19937_chunks_are_torch_generators_seeded_per_chunk(restore_threads):
    torch.set_num_threads(2)
    out = nz.NoiseSource(5, "mt19937").normal_(torch.empty(SHAPE), 3, "w", "z0").view(-1)
    seed = nz.stream_seed(5, 3, "w", "z0")
    n = out.numel()
    for k in range((n + nz.CHUNK - 1) // nz.CHUNK):
        part = out[k * nz.CHUNK:(k + 1) * nz.CHUNK]
        ref = torch.empty(part.numel()).normal_(generator=torch.Generator().manual_seed(nz.chunk_seed(seed, k)))
        assert torch.equal(part, ref), k
    assert len({nz.chunk_seed(seed, k) for k in range(4)}) == 4
    # a small tensor is one chunk: the stream seed itself
    small = nz.NoiseSource(5, "mt19937").normal_(torch.empty(10, 3), 3, "b", "z0")
    assert torch.equal(small, torch.empty(10, 3).normal_(generator=torch.Generator().manual_seed(
        nz.stream_seed(5, 3, "b", "z0"))))


@pytest.mark.parametrize("generator", nz.GENERATORS)
def test_values_do_not_depend_on_the_target_layout(generator):
    src = nz.NoiseSource(1, generator)
    contiguous = src.normal_(torch.empty(300, 200), 0, "w", "z0")
    strided = torch.empty(200, 300).t()
    assert torch.equal(src.normal_(strided, 0, "w", "z0"), contiguous)


# ------------------------------------------------------------------------------------ named variants
def test_rademacher_is_plus_minus_one_with_fair_bits_in_every_byte(restore_threads):
    torch.set_num_threads(1)
    z = nz.RademacherNoise(3).normal_(torch.empty(1 << 22), 0, "w", "z0")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    n = z.numel()
    assert abs(float(z.mean())) < 5 / n ** 0.5              # mean 0 (5 sigma)
    assert float(z.square().mean()) == 1.0                   # variance 1, exactly
    # every value comes from bit 0 of one byte of a 64-bit draw: each byte position (incl. the top byte,
    # whose bit 63 is always 0) must be fair, and neighbours uncorrelated
    by_byte = z.view(-1, 8).mean(0)
    assert by_byte.abs().max() < 5 / (n / 8) ** 0.5, by_byte
    assert abs(float((z[1:] * z[:-1]).mean())) < 5 / n ** 0.5
    # another step / tensor / stream is another draw
    other = nz.RademacherNoise(3).normal_(torch.empty(1 << 22), 1, "w", "z0")
    assert abs(float((z * other).mean())) < 5 / n ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rademacher_same_values_with_1_2_and_4_threads(restore_threads, dtype):
    draws = {}
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        draws[threads] = nz.RademacherNoise(5).normal_(torch.empty(SHAPE, dtype=dtype), 3, "w", "z0")
    assert torch.equal(draws[1], draws[2]) and torch.equal(draws[1], draws[4])
    assert set(draws[1].unique().float().tolist()) == {-1.0, 1.0}
    # uniform_ stays U[0, 1) (stochastic rounding) in every variant
    u = nz.RademacherNoise(5).uniform_(torch.empty(1000), 3, "w", "sr")
    assert torch.equal(u, nz.NoiseSource(5).uniform_(torch.empty(1000), 3, "w", "sr"))


def test_flat_spectrum_pool_moments_and_autocorrelation():
    size = 1 << 14
    pool = nz.flat_spectrum_pool(11, size).double()
    assert abs(float(pool.mean())) < 1e-6
    assert float(pool.square().mean()) == pytest.approx(1.0, abs=1e-6)
    # circular autocorrelation (mean over offsets o of pool[o] * pool[o + d]): -1/(size-1) at every lag d != 0
    spec = torch.fft.rfft(pool)
    acf = torch.fft.irfft(spec.abs().square(), n=size) / size
    assert float(acf[0]) == pytest.approx(1.0, abs=1e-6)
    assert float((acf[1:] + 1 / (size - 1)).abs().max()) < 1e-6
    # marginal close to N(0, 1): fourth moment ~3, about 68% within one standard deviation
    assert 2.8 < float(pool.pow(4).mean()) < 3.2
    assert 0.66 < float((pool.abs() < 1).double().mean()) < 0.70
    # a plain normal draw does not have that flat autocorrelation (the test can fail)
    white = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    white_acf = torch.fft.irfft(torch.fft.rfft(white).abs().square(), n=size) / size
    assert float((white_acf[1:] + 1 / (size - 1)).abs().max()) > 1e-3


def test_pool_reads_windows_at_per_segment_offsets_and_add_is_fused():
    src = nz.PoolNoise(2)
    pool = src.pool()
    assert pool.numel() == src.size + nz.CHUNK and torch.equal(pool[src.size:], pool[:nz.CHUNK])
    z = src.normal_(torch.empty(SHAPE), 4, "w", "z0").view(-1)
    offsets = src.offsets(4, "w", "z0", z.numel())
    assert len(offsets) == 4 and len(set(offsets)) == 4 and all(0 <= o < src.size for o in offsets)
    for k, o in enumerate(offsets):
        part = z[k * nz.CHUNK:(k + 1) * nz.CHUNK]
        assert torch.equal(part, pool[o:o + part.numel()]), k
    assert src.offsets(5, "w", "z0", z.numel()) != offsets and src.offsets(4, "v", "z0", z.numel()) != offsets
    theta = torch.randn(SHAPE)
    out = src.add_(torch.empty(SHAPE), theta, 0.25, 4, "w", "z0")
    assert torch.equal(out, torch.add(theta, z.view(SHAPE), alpha=0.25))
    before = theta.clone()
    src.add_(theta, theta, -0.5, 4, "w", "z0")  # in place
    assert torch.equal(theta, torch.add(before, z.view(SHAPE), alpha=-0.5))
    # a strided target gets the values of the contiguous layout
    assert torch.equal(src.normal_(torch.empty(SHAPE[::-1]).t(), 4, "w", "z0"), z.view(SHAPE))
    # bf16 and resumes: the same pool from the same seed
    assert torch.equal(src.reseeded(3).reseeded(2).pool(), pool)
    assert src.reseeded(2) is src


def test_pool_over_random_offsets_has_zero_mean_and_identity_covariance():
    """Averaged over draws (steps), E[z_i] ~ 0, E[z_i^2] ~ 1, E[z_i z_j] ~ 0: what SPSA needs of its noise."""
    src = nz.PoolNoise(9)
    draws = torch.stack([src.normal(torch.Size([64]), t, "w", "z0") for t in range(4000)]).double()
    assert draws.mean(0).abs().max() < 5 / 4000 ** 0.5
    cov = draws.T @ draws / 4000
    assert (cov.diagonal() - 1).abs().max() < 0.15
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 6 / 4000 ** 0.5


def test_make_noise_names_the_variants():
    assert {k: type(nz.make_noise(k, 0)).__name__ for k in nz.NOISE_KINDS} == {
        "gaussian": "NoiseSource", "rademacher": "RademacherNoise", "pool": "PoolNoise"}
    with pytest.raises(ValueError, match="gaussian, rademacher, pool"):
        nz.make_noise("lowrank", 0)


def test_pool_same_values_with_1_and_4_threads(restore_threads):
    pools = {}
    for threads in (1, 4):
        torch.set_num_threads(threads)
        pools[threads] = nz.PoolNoise(5).normal_(torch.empty(SHAPE), 3, "w", "z0")
    assert torch.equal(pools[1], pools[4])
