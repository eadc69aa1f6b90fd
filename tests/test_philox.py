"""The Philox noise kernel: the C kernel and the torch implementation give the same bits, any range of a draw
is the same part of the whole draw, and the values have the statistics they claim."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from zoedge.noise import philox

native = pytest.mark.skipif(philox.backend() != "native", reason=f"no C kernel: {philox.backend()}")
KEY = 0x0123_4567_89AB_CDEF


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@native
@pytest.mark.parametrize("kind", list(philox.KINDS))
@pytest.mark.parametrize("start,n", [(0, 1 << 18), (3, 1000), (257, 70_001), (1 << 33, 513), (5, 1), (0, 0)])
def test_kernel_and_torch_implementation_agree_bit_for_bit(kind, start, n):
    a = philox.fill_(torch.empty(n), KEY, start, kind)
    b = philox.reference_fill_(torch.empty(n), KEY, start, kind)
    assert torch.equal(_bits(a), _bits(b))


def test_the_philox_stream_matches_the_published_known_answer():
    """Philox4x32-10 of counter (0, 0, 0, 0) and key (0, 0), from the Random123 known-answer tests."""
    words = philox._words(0, 1, 0).tolist()
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("kind", list(philox.KINDS))
def test_a_range_is_that_part_of_the_whole_draw(kind):
    whole = philox.fill_(torch.empty(5000), 7, 0, kind)
    for start, n in [(0, 1), (1, 1), (255, 2), (1023, 1500), (4999, 1)]:
        assert torch.equal(philox.fill_(torch.empty(n), 7, start, kind), whole[start:start + n]), (start, n)
    assert not torch.equal(philox.fill_(torch.empty(5000), 8, 0, kind), whole)  # another key, another draw


def test_other_dtypes_get_the_fp32_values_rounded():
    ref = philox.fill_(torch.empty(999), 3, 11)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert torch.equal(philox.fill_(torch.empty(999, dtype=dtype), 3, 11), ref.to(dtype))


def test_normal_values_have_the_moments_and_tails_of_n01():
    n = 1 << 22
    z = philox.fill_(torch.empty(n), 12345).double()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert float(z.var()) == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    assert float(z.pow(3).mean()) == pytest.approx(0.0, abs=5 * math.sqrt(15 / n))
    assert float(z.pow(4).mean()) == pytest.approx(3.0, abs=5 * math.sqrt(96 / n))
    # the two values of a Box-Muller pair and neighbouring pairs are uncorrelated
    assert abs(float((z[0::2] * z[1::2]).mean())) < 5 / math.sqrt(n / 2)
    assert abs(float((z[1:-1:2] * z[2::2]).mean())) < 5 / math.sqrt(n / 2)
    # P(|z| > 3) = 0.0027; nothing beyond the documented cut at sqrt(2 ln 2^24) = 5.77
    tail = float((z.abs() > 3).double().mean())
    assert tail == pytest.approx(0.0026998, abs=5 * math.sqrt(0.0027 / n))
    assert float(z.abs().max()) <= math.sqrt(2 * 24 * math.log(2)) + 1e-6
    # the quantiles of N(0, 1) (a Kolmogorov-Smirnov-style check on a grid)
    grid = torch.linspace(-3, 3, 25, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.special.erf(grid / math.sqrt(2)))
    empirical = (z.unsqueeze(0) <= grid.unsqueeze(1)).double().mean(1)
    assert float((empirical - cdf).abs().max()) < 1.63 * 2 / math.sqrt(n)


def test_uniform_and_rademacher_values():
    n = 1 << 20
    u = philox.fill_(torch.empty(n), 5, 0, "uniform").double()
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert float(u.mean()) == pytest.approx(0.5, abs=5 * math.sqrt(1 / 12 / n))
    assert torch.equal(u * 2**24, (u * 2**24).floor())  # 24-bit resolution
    r = philox.fill_(torch.empty(n), 5, 0, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(r.mean())) < 5 / math.sqrt(n)
    assert abs(float((r[1:] * r[:-1]).mean())) < 5 / math.sqrt(n)


def test_bad_kind_or_key_is_refused():
    with pytest.raises(ValueError, match="unknown kind 'gauss'"):
        philox.fill_(torch.empty(4), 1, 0, "gauss")
    with pytest.raises(ValueError, match="64-bit"):
        philox.fill_(torch.empty(4), -1)


def test_without_a_compiler_the_torch_implementation_is_used_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    kernel = philox._Kernel()
    with pytest.warns(RuntimeWarning, match="no C compiler .*no-such-cc.* Fix: install a C compiler"):
        assert kernel.load() is None
    assert "no-such-cc" in kernel.why_not


@native
def test_the_library_is_built_once_per_cache_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path))
    first = philox._Kernel()
    assert first.load() is not None and first.path.parent == tmp_path / "kernels"
    built = first.path.stat().st_mtime_ns
    again = philox._Kernel()
    assert again.load() is not None and again.path == first.path and again.path.stat().st_mtime_ns == built
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.path.name]  # no temporaries left


@native
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_fill_many_pieces_are_the_whole_draw_on_any_number_of_threads(threads):
    whole = philox.fill_(torch.empty(300_000), KEY, 17)
    out = torch.empty(300_000)
    cuts = [0, 1, 4096, 4097, 70_000, 200_003, 300_000]
    pieces = [(out[a:b], KEY, 17 + a, "normal") for a, b in zip(cuts, cuts[1:])]
    philox.fill_many(pieces, threads)
    assert torch.equal(_bits(out), _bits(whole))
    with pytest.raises(ValueError, match="contiguous fp32"):
        philox.fill_many([(torch.empty(8, dtype=torch.float64), KEY, 0, "normal")], threads)


@native
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux: /proc/self/maps lists the loaded libraries")
def test_the_kernel_runs_on_torchs_own_openmp_runtime():
    """Built with OpenMP, the library must bind to the libgomp torch loaded (its threads are torch's intra-op
    threads), not load a second runtime whose threads would compete with torch's."""
    if not philox.parallel():
        pytest.skip("the kernel was built without OpenMP")
    loaded = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "gomp" in line}
    assert len(loaded) == 1, loaded


@native
def test_a_damaged_cached_library_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path))
    path = philox._Kernel()._build(shutil.which(os.environ.get("CC", "cc")))  # built, not loaded in this process
    path.write_bytes(b"not a shared library")
    again = philox._Kernel()
    assert again.load() is not None and again.path == path and path.stat().st_size > 1000
    assert torch.equal(_bits(philox.fill_(torch.empty(64), 3)), _bits(philox.reference_fill_(torch.empty(64), 3)))


def test_rademacher_value_i_is_bit_i_mod_32_of_word_i_div_32():
    words = philox._words(0, 4, KEY).tolist()  # 16 words: values 0..511
    expected = [-1.0 if words[i // 32] >> (i % 32) & 1 else 1.0 for i in range(512)]
    assert philox.fill_(torch.empty(512), KEY, 0, "rademacher").tolist() == expected
    assert philox.fill_(torch.empty(100), KEY, 300, "rademacher").tolist() == expected[300:400]
