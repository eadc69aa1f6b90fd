"""Counter-based CPU noise: Philox4x32-10 words turned into N(0, 1), U[0, 1) or ±1 values.

Value ``i`` of the draw with 64-bit ``key`` is made from word ``i`` of the Philox4x32-10 stream of that key
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), so any range of a draw is filled on
its own, by any thread, with the values of the whole draw:

* ``normal``: words ``2p`` and ``2p + 1`` give values ``2p`` (``r cos θ``) and ``2p + 1`` (``r sin θ``) by
  Box–Muller, with ``r = sqrt(-2 ln u1)``, ``u1 = (word >> 8 + 1) / 2^24`` in (0, 1] (so ``|z| ≤ 5.77``,
  the tail beyond is cut: probability 8e-9) and ``θ = 2π (word >> 8) / 2^24``;
* ``uniform``: ``(word >> 8) / 2^24`` in [0, 1);
* ``rademacher``: ``-1`` when bit ``i % 32`` of word ``i // 32`` is set, else ``+1`` (32 values per word).

Two implementations give the same bits: a C kernel (``philox.c``; vectorised: per thread, 1.3x faster than
torch's ``normal_`` as AVX2 code and 2.5x as AVX-512 code on zoedge's 2-core AMD EPYC box) and
:func:`reference_fill_`, the same operations in torch (the fallback when no kernel loads, with a warning;
20-30x slower). The kernel is, in this order: the library built when zoedge was installed
(``_philox<EXT_SUFFIX>`` next to this file, built by setup.py: no compiler needed at run time; refused if
built from another ``philox.c``), or, as a fallback, one compiled on first use with the system's C compiler
into ``$ZOEDGE_CACHE/kernels``. :func:`kernel` says which one runs. The values are fp32 by IEEE arithmetic in a fixed order,
so they are the same on every CPU (``tests/test_philox.py`` compares the two bit for bit). Set
``ZOEDGE_NATIVE=0`` to use the torch implementation.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

KINDS = {"normal": 0, "uniform": 1, "rademacher": 2}
SOURCE = Path(__file__).with_name("philox.c")
#: how the kernel is compiled at first use: ``-ffp-contract=off`` keeps a*b + c two roundings (the values depend on
#: it); ``-DZOEDGE_NO_CLONES``: one copy of the value loops, for this CPU (``-march=native``), not one per ISA level
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-DZOEDGE_NO_CLONES", "-shared", "-fPIC")
#: optional flags, each dropped if the compiler refuses it: the CPU's vector units, and OpenMP (the library then
#: runs :func:`fill_many` on the OpenMP threads torch already runs: see ``philox.c``)
OPTIONAL = ("-march=native", "-fopenmp")

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
# philox.c's float32 constants (the same bit patterns)
_F = {name: float.fromhex(h) for name, h in {
    "SQRT2": "0x1.6a09e6p+0", "LN2_HI": "0x1.62e4p-1", "LN2_LO": "0x1.7f7d1cp-20",
    "L3": "0x1.555556p-2", "L5": "0x1.99999ap-3", "L7": "0x1.24924ap-3", "L9": "0x1.c71c72p-4",
    "L11": "0x1.745d18p-4", "PI_4": "0x1.921fb6p-1",
    "S3": "-0x1.555556p-3", "S5": "0x1.111112p-7", "S7": "-0x1.a01a02p-13", "S9": "0x1.71de3ap-19",
    "C2": "-0x1p-1", "C4": "0x1.555556p-5", "C6": "-0x1.6c16c2p-10", "C8": "0x1.a01a02p-16",
    "C10": "-0x1.27e4fcp-22", "TWO_M24": "0x1p-24", "TWO_M21": "0x1p-21"}.items()}
#: values per piece of the torch implementation (bounds its temporaries)
_TORCH_PIECE = 1 << 18
#: values per piece of :func:`fill_many` on torch's threads (about 0.1 ms of work: many pieces per block, for balance)
PIECE = 1 << 16


# --------------------------------------------------------------------------- the torch implementation
def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``m * c`` (``c``: int64 values in [0, 2^32)), without overflowing int64."""
    p_lo, p_hi = c * (m & 0xFFFF), c * (m >> 16)  # each < 2^48
    return (p_hi + (p_lo >> 16)) >> 16, (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32


def _words(first_block: int, blocks: int, key: int) -> torch.Tensor:
    """Words ``[4 first_block, 4 (first_block + blocks))`` of the stream of ``key`` (int64 values < 2^32)."""
    block = torch.arange(first_block, first_block + blocks, dtype=torch.int64)
    c0, c1 = block & _MASK32, block >> 32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    a0, a1 = key & _MASK32, key >> 32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ a0, lo1, hi0 ^ c3 ^ a1, lo0
        a0, a1 = (a0 + _W0) & _MASK32, (a1 + _W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=1).view(-1)


def _log_unit(x: torch.Tensor) -> torch.Tensor:
    """philox.c's ``log_unit``: ln x for fp32 x in (0, 1]."""
    f = _F
    bits = x.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = (m > f["SQRT2"]).to(torch.int32)
    m = m * (0x3F800000 - (big << 23)).view(torch.float32)
    e = e + big
    g = m - 1.0
    s = g / (2.0 + g)
    s2 = s * s
    series = 1.0 + s2 * (f["L3"] + s2 * (f["L5"] + s2 * (f["L7"] + s2 * (f["L9"] + s2 * f["L11"]))))
    ef = e.to(torch.float32)
    return ef * f["LN2_HI"] + (ef * f["LN2_LO"] + 2.0 * s * series)


def _box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """philox.c's ``box_muller`` on int64 words ``a``, ``b``: (r cos θ, r sin θ) in fp32."""
    f = _F
    u1 = ((a >> 8) + 1).to(torch.float32) * f["TWO_M24"]
    # torch's fp32 sqrt is not always correctly rounded (AVX-512 builds); the fp64 root rounded to fp32 is
    r = torch.sqrt((-2.0 * _log_unit(u1)).double()).to(torch.float32)
    v = b >> 8
    octant = v >> 21
    y = (v & 0x1FFFFF).to(torch.float32) * f["TWO_M21"] - (octant & 1).to(torch.float32)
    t = y * f["PI_4"]
    t2 = t * t
    s = t * (1.0 + t2 * (f["S3"] + t2 * (f["S5"] + t2 * (f["S7"] + t2 * f["S9"]))))
    c = 1.0 + t2 * (f["C2"] + t2 * (f["C4"] + t2 * (f["C6"] + t2 * (f["C8"] + t2 * f["C10"]))))
    q = ((octant + 1) >> 1) & 3
    odd = (q & 1).bool()
    sin_q, cos_q = torch.where(odd, c, s), torch.where(odd, s, c)
    sin_q = torch.where((q & 2).bool(), -sin_q, sin_q)
    cos_q = torch.where(((q + 1) & 2).bool(), -cos_q, cos_q)
    return r * cos_q, r * sin_q


def _values(start: int, n: int, key: int, kind: str) -> torch.Tensor:
    """Values ``[start, start + n)`` of a draw, in fp32, by torch operations."""
    if kind == "rademacher":  # value i: bit i % 32 of word i // 32
        first, last = start // 128, (start + n + 127) // 128
        words = _words(first, last - first, key)
        i = torch.arange(start, start + n, dtype=torch.int64)
        bits = (words[i // 32 - 4 * first] >> (i % 32)) & 1
        return torch.where(bits == 1, -1.0, 1.0).to(torch.float32)
    first, last = start // 4, (start + n + 3) // 4
    words = _words(first, last - first, key)
    if kind == "normal":
        z_cos, z_sin = _box_muller(words[0::2], words[1::2])
        values = torch.stack([z_cos, z_sin], dim=1).view(-1)
    else:
        values = (words >> 8).to(torch.float32) * _F["TWO_M24"]
    return values[start - 4 * first:start - 4 * first + n]


def reference_fill_(out: torch.Tensor, key: int, start: int = 0, kind: str = "normal") -> torch.Tensor:
    """Fill contiguous 1-D CPU ``out`` with values ``[start, start + out.numel())`` of the draw of ``key`` by
    torch operations (what the C kernel computes, bit for bit); returns ``out``."""
    for lo in range(0, out.numel(), _TORCH_PIECE):
        hi = min(out.numel(), lo + _TORCH_PIECE)
        out[lo:hi].copy_(_values(start + lo, hi - lo, key, kind))
    return out


# --------------------------------------------------------------------------- the C kernel
class _Kernel:
    """The compiled ``philox.c``, built once per (source, compiler, flags, CPU) and loaded lazily."""

    def __init__(self, installed: bool = True) -> None:
        self.installed = installed  # try the library built at install time first
        self.origin: str | None = None  # "installed" or "built at first use"
        self.installed_why: str | None = None  # why the installed library is not used
        self.lock = threading.Lock()
        self.fn = None
        self.many = None  # zoedge_philox_fill_many
        self.parallel = False  # built with OpenMP
        self.tried = False
        self.why_not: str | None = None  # why the torch implementation is in use
        self.path: Path | None = None

    def load(self):
        if self.tried:
            return self.fn
        with self.lock:
            if not self.tried:
                try:
                    self.fn = self._load()
                except _Unavailable as e:
                    self.why_not = str(e) if self.installed_why is None else f"{self.installed_why}; {e}"
                    if not e.quiet:
                        warnings.warn(f"zoedge's noise kernel is unavailable ({self.why_not}); drawing noise with "
                                      "torch operations instead (the same values, 20-30x slower). Fix: reinstall "
                                      "zoedge where a C compiler works (pip builds the kernel then), or install "
                                      "one (gcc or clang as `cc`, or set CC)", RuntimeWarning, stacklevel=4)
                self.tried = True
        return self.fn

    def _load(self):
        self.installed_why = None
        if os.environ.get("ZOEDGE_NATIVE", "1") == "0":
            raise _Unavailable("ZOEDGE_NATIVE=0", quiet=True)
        if self.installed:
            try:
                return self._bind(_installed_library(), "installed")
            except _Unavailable as e:
                self.installed_why = str(e)
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            raise _Unavailable(f"no C compiler {os.environ.get('CC', 'cc')!r} on PATH")
        path = self._build(compiler)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a damaged cached library (the build itself is atomic): build it again, once
            path.unlink(missing_ok=True)
            path = self._build(compiler)
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise _Unavailable(f"{path} does not load: {e}") from e
        return self._bind((lib, path), "built at first use")

    def _bind(self, loaded: tuple[ctypes.CDLL, Path], origin: str):
        lib, path = loaded
        fn = lib.zoedge_philox_fill
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int]
        fn.restype = None
        self.many = lib.zoedge_philox_fill_many
        self.many.argtypes = [ctypes.POINTER(_FillJob), ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        self.many.restype = None
        self.parallel = bool(lib.zoedge_philox_parallel())
        self.path, self.origin = path, origin
        return fn

    def _build(self, compiler: str) -> Path:
        from zoedge.models.default import default_cache_root

        source = SOURCE.read_bytes()
        try:
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise _Unavailable(f"{compiler} --version failed: {e}") from e
        tag = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS + OPTIONAL).encode(),
                                         _cpu_flags().encode()])).hexdigest()[:16]
        folder = default_cache_root() / "kernels"
        path = folder / f"philox-{tag}{_suffix()}"
        if path.exists():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        errors = []
        options = [[f for i, f in enumerate(OPTIONAL) if not drop >> i & 1] for drop in range(1 << len(OPTIONAL))]
        for extra in options:  # all of OPTIONAL first, then fewer
            cmd = [compiler, *FLAGS, *extra, str(SOURCE), "-o", str(tmp)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{' '.join(cmd)}: {e}")
                continue
            if done.returncode == 0:
                os.replace(tmp, path)  # atomic: a concurrent process either sees none or a whole library
                return path
            errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-400:]}")
        tmp.unlink(missing_ok=True)
        raise _Unavailable("compiling philox.c failed: " + " | ".join(errors))


def _installed_library() -> tuple[ctypes.CDLL, Path]:
    """The library setup.py built from ``philox.c`` (loaded), if there is one and it was built from this source.

    Raises:
        _Unavailable: none installed, it does not load, or it was built from another ``philox.c``.
    """
    here = Path(__file__).parent
    paths = [here / f"_philox{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise _Unavailable("no kernel was built when zoedge was installed")
    try:
        lib = ctypes.CDLL(str(path))
        source_sha256 = lib.zoedge_philox_source_sha256
        source_sha256.restype = ctypes.c_char_p
        built_from = source_sha256().decode()
    except (OSError, AttributeError) as e:
        raise _Unavailable(f"the installed kernel {path} does not load: {e}") from e
    if SOURCE.is_file() and built_from != hashlib.sha256(SOURCE.read_bytes()).hexdigest():
        raise _Unavailable(f"the installed kernel {path} was built from another philox.c (reinstall zoedge)")
    return lib, path


class _FillJob(ctypes.Structure):
    """``zoedge_fill_job`` of ``philox.c``."""

    _fields_ = [("out", ctypes.c_void_p), ("n", ctypes.c_int64), ("start", ctypes.c_int64), ("key", ctypes.c_uint64),
                ("kind", ctypes.c_int64)]


class _Unavailable(Exception):
    def __init__(self, why: str, quiet: bool = False) -> None:
        super().__init__(why)
        self.quiet = quiet


def _cpu_flags() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them, else the machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _suffix() -> str:
    return {"Darwin": ".dylib", "Windows": ".dll"}.get(platform.system(), ".so")


_KERNEL = _Kernel()


def backend(load: bool = True) -> str:
    """``"native"`` (the C kernel) or ``"torch (<why>)"``: what :func:`fill_` uses in this process; with
    ``load=False``, ``"unused"`` if nothing has drawn with it yet (nothing is built then)."""
    if not load and not _KERNEL.tried:
        return "unused"
    return "native" if _KERNEL.load() is not None else f"torch ({_KERNEL.why_not})"


def kernel() -> str | None:
    """Which C kernel :func:`fill_` runs: ``"installed: PATH"`` (built with zoedge), ``"built at first use: PATH"``,
    or None (the torch implementation; or nothing has drawn yet)."""
    if not _KERNEL.tried or _KERNEL.fn is None:
        return None
    return f"{_KERNEL.origin}: {_KERNEL.path}"


def parallel() -> bool:
    """True when :func:`fill_many` runs its pieces in parallel (the C kernel, built with OpenMP)."""
    return _KERNEL.load() is not None and _KERNEL.parallel


def fill_many(fills: list[tuple[torch.Tensor, int, int, str]], threads: int, piece: int = PIECE) -> None:
    """Make each fill ``(out, key, start, kind)`` as :func:`fill_` does, ``out`` being 1-D, contiguous, fp32 and on
    the CPU: cut into pieces of at most ``piece`` values, drawn on ``threads`` threads of torch's OpenMP pool when
    :func:`parallel` (else one fill after another). The values depend neither on the pieces nor on the threads."""
    fn = _KERNEL.load()
    if fn is None or not _KERNEL.parallel:
        for out, key, start, kind in fills:
            fill_(out, key, start, kind)
        return
    jobs = (_FillJob * len(fills))()
    for job, (out, key, start, kind) in zip(jobs, fills):
        if out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"fill_many needs contiguous fp32 CPU targets, got {out.dtype} on {out.device}")
        job.out, job.n, job.start, job.key, job.kind = out.data_ptr(), out.numel(), start, key, KINDS[kind]
    _KERNEL.many(jobs, len(fills), piece, threads)  # the GIL is released; ``fills`` keeps the targets alive


def fill_(out: torch.Tensor, key: int, start: int = 0, kind: str = "normal") -> torch.Tensor:
    """Fill 1-D CPU ``out`` (any float dtype: fp32 values rounded to it) with values
    ``[start, start + out.numel())`` of the draw of ``key``; returns ``out``. Thread-safe: threads may fill
    different parts of one draw at the same time (the GIL is released while the kernel runs)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if not 0 <= key < 1 << 64:
        raise ValueError(f"key {key} is not a 64-bit unsigned value")
    target = out if out.dtype == torch.float32 and out.is_contiguous() else torch.empty(out.numel())
    fn = _KERNEL.load()
    if fn is None:
        reference_fill_(target, key, start, kind)
    elif target.numel():
        fn(target.data_ptr(), target.numel(), start, key, KINDS[kind])
    if target is not out:
        out.copy_(target.view(out.shape))
    return out
