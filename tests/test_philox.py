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


def test_without_a_kernel_or_a_compiler_the_torch_implementation_is_used_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(philox, "__file__", str(tmp_path / "philox.py"))  # no installed library next to it
    kernel = philox._Kernel()
    with pytest.warns(RuntimeWarning, match="no kernel was built when zoedge was installed; no C compiler "
                      ".*no-such-cc.* Fix: reinstall zoedge where a C compiler works"):
        assert kernel.load() is None
    assert "no-such-cc" in kernel.why_not


@native
def test_the_library_is_built_once_per_cache_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path))
    first = philox._Kernel(installed=False)  # the run-time build (the fallback to the installed library)
    assert first.load() is not None and first.path.parent == tmp_path / "kernels"
    assert first.origin == "built at first use"
    built = first.path.stat().st_mtime_ns
    again = philox._Kernel(installed=False)
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
    again = philox._Kernel(installed=False)
    assert again.load() is not None and again.path == path and path.stat().st_size > 1000
    assert torch.equal(_bits(philox.fill_(torch.empty(64), 3)), _bits(philox.reference_fill_(torch.empty(64), 3)))


def test_rademacher_value_i_is_bit_i_mod_32_of_word_i_div_32():
    words = philox._words(0, 4, KEY).tolist()  # 16 words: values 0..511
    expected = [-1.0 if words[i // 32] >> (i % 32) & 1 else 1.0 for i in range(512)]
    assert philox.fill_(torch.empty(512), KEY, 0, "rademacher").tolist() == expected
    assert philox.fill_(torch.empty(100), KEY, 300, "rademacher").tolist() == expected[300:400]


# ------------------------------------------------------------------------------ the kernel built at install time
INSTALLED = [p for p in Path(philox.__file__).parent.glob("_philox*") if p.suffix in (".so", ".pyd", ".dylib")]
installed = pytest.mark.skipif(not INSTALLED, reason="zoedge was installed without building the kernel (no compiler)")


def _without_a_compiler(tmp_path) -> dict[str, str]:
    """The environment of a process that finds no C compiler: an empty PATH, no CC."""
    (tmp_path / "empty-bin").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "ZOEDGE_NATIVE")}
    return {**env, "PATH": str(tmp_path / "empty-bin"), "ZOEDGE_CACHE": str(tmp_path / "cache")}


@installed
def test_the_installed_kernel_loads_without_a_compiler_and_gives_the_reference_bits(tmp_path):
    import subprocess
    import sys

    script = ("import shutil, torch\n"
              "from zoedge.noise import philox\n"
              "assert shutil.which('cc') is None and shutil.which('gcc') is None\n"
              "a = philox.fill_(torch.empty(70001), 99, 257)\n"
              "b = philox.reference_fill_(torch.empty(70001), 99, 257)\n"
              "assert torch.equal(a.view(torch.int32), b.view(torch.int32))\n"
              "print(philox.backend(), philox.parallel(), philox.kernel(), sep='|')\n")
    done = subprocess.run([sys.executable, "-c", script], env=_without_a_compiler(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    backend, parallel, kernel = done.stdout.strip().split("|")
    assert backend == "native" and kernel.startswith("installed: ") and parallel in ("True", "False")
    assert not (tmp_path / "cache" / "kernels").exists()  # nothing compiled at run time


@installed
def test_an_installed_kernel_built_from_another_source_is_not_used(monkeypatch, tmp_path):
    edited = tmp_path / "philox.c"
    edited.write_bytes(philox.SOURCE.read_bytes() + b"\n/* edited after the install */\n")
    monkeypatch.setattr(philox, "SOURCE", edited)
    with pytest.raises(philox._Unavailable, match="built from another philox.c"):
        philox._installed_library()
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path))
    kernel = philox._Kernel()
    if shutil.which(os.environ.get("CC", "cc")):  # the run-time build takes over, from the edited source
        assert kernel.load() is not None and kernel.origin == "built at first use"
        assert "built from another philox.c" in kernel.installed_why


@installed
def test_the_installed_kernel_is_preferred_and_named():
    kernel = philox._Kernel()
    assert kernel.load() is not None and kernel.origin == "installed" and kernel.path in INSTALLED


@installed
def test_a_finetune_run_without_a_compiler_uses_and_records_the_installed_kernel(tmp_path):
    """As the demo, on a tiny model: no `cc` on PATH after the install; summary.json's noise says which kernel ran."""
    import json
    import subprocess
    import sys

    from tests.tiny import save_cli_llama, write_demo_jsonl

    save_cli_llama(tmp_path / "hf")
    write_demo_jsonl(tmp_path / "train.jsonl", 24)
    argv = [sys.executable, "-m", "zoedge", "finetune", "--model", str(tmp_path / "hf"), "--train",
            str(tmp_path / "train.jsonl"), "--batch-size", "4", "--n-train", "16", "--n-dev", "4", "--n-test", "4",
            "--steps", "1", "--threads", "1", "--no-progress", "--no-plot", "--no-export", "--output",
            str(tmp_path / "run")]
    done = subprocess.run(argv, env=_without_a_compiler(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "noise kernel is unavailable" not in done.stderr
    noise = json.loads((tmp_path / "run" / "summary.json").read_text())["noise"]
    assert noise["cpu_backend"] == "native" and noise["cpu_kernel"].startswith("installed: "), noise
