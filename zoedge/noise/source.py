"""Counter-based noise: every draw is a pure function of (run seed, step, tensor name, stream).

``stream_seed(run_seed, step, name, stream)`` is the first 63 bits of
``sha256(f"zoedge/{run_seed}/{step}/{stream}/{name}")``. How a draw's values follow from it is the source's
*generator* (:data:`GENERATORS`, recorded in checkpoints):

* ``philox`` (the default): on the CPU, value ``i`` of a tensor's flattened, contiguous layout is made from word
  ``i`` of the Philox4x32-10 stream keyed by the stream seed (:mod:`zoedge.noise.philox`: a vectorised C kernel,
  or the same operations in torch). The values are the same on every CPU and do not depend on how a draw is
  split: a target is filled in chunks of :data:`CHUNK` elements, in parallel on the intra-op threads.
* ``mt19937`` (zoedge's noise before the Philox kernel; checkpoints that do not name a generator use it):
  chunk ``k`` of :data:`CHUNK` elements is drawn by torch's CPU generator seeded with
  ``chunk_seed(stream_seed(...), k)`` (chunk 0 uses the stream seed itself).

On an accelerator, with either generator, a draw re-seeds one reusable ``torch.Generator`` with the stream seed
and fills the whole target. Consequences:

* a tensor's noise does not depend on the order blocks are visited in, nor on
  what else was drawn before (each draw starts a fresh generator state);
* independent objects use distinct ``stream`` labels (``"z0"``, ``"z1"`` for
  directions, ``"U"`` / ``"V"`` for low-rank factors), so redrawing one never
  shifts another;
* values are reproducible per device type and dtype: CPU and CUDA generators
  produce different numbers for the same seed; a bf16 target gets the fp32 Philox values rounded to bf16 on the
  CPU, and is filled directly in bf16 by torch's generators;
* so who draws them does not matter: a block's whole-tensor draws may be queued
  (:meth:`NoiseSource.draw` → :meth:`NoiseDraw.queue`) and drawn together in
  one :func:`batched_draws` block, every tensor's chunks in parallel, and a
  :class:`~zoedge.noise.cache.NoiseCache` may serve a draw made before.

Named variants (:data:`NOISE_KINDS`, :func:`make_noise`; a plugin option such as MeZO's ``noise=``) replace
the N(0, 1) *direction* draw (``normal_``) with cheaper noise of zero mean and unit variance; ``uniform_``
(e.g. for stochastic rounding) stays U[0, 1) in every variant. Their statistics, checked by
``tests/test_noise.py`` and compared in training by ``tools/bench_convergence.py --opt mezo:noise=KIND``:

* ``gaussian`` (:class:`NoiseSource`, the default): independent N(0, 1) values.
* ``rademacher`` (:class:`RademacherNoise`): independent ±1 values, each with probability 1/2 (mean 0,
  variance 1, fourth moment 1 instead of 3: every direction has norm exactly √n). ``philox``: bit ``i % 32``
  of word ``i // 32`` (32 values per word); ``mt19937``: bit 0 of each byte of 64-bit draws.
* ``pool`` (:class:`PoolNoise`): no per-step draw at all. One pool of ``size`` values is drawn once per run;
  each :data:`CHUNK`-element segment of a tensor's flattened layout reads the pool at its own random offset
  (a pure function of (seed, step, tensor, stream, segment)). The pool has a flat spectrum: a normal draw
  whose Fourier magnitudes are set to one and whose mean (DC term) is set to zero, scaled to unit mean
  square. Hence, over the random offsets and conditionally on the pool: E[z_i] = 0 exactly, E[z_i²] = 1,
  and E[z_i z_j] = -1/(size - 1) for two positions of one segment (0 across segments), at every lag: the
  SPSA estimate keeps E[z zᵀ] ≈ I as with Gaussian noise. Caveats: the values are not independent. A
  segment is one of only ``size`` windows of one fixed pool (the directions explored are far fewer than
  with fresh noise); two draws whose offsets are close share values, shifted (uncorrelated in expectation,
  since the pool's autocorrelation is flat, but identical numbers); and each value's marginal law is the
  pool's empirical one (close to N(0, 1): the pool is a sum of many random phases). Perturbing and
  updating read the pool directly (:meth:`PoolNoise.add_`), so a step does no noise generation and needs
  no noise workspace.
"""
from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch

from zoedge.noise import philox

if TYPE_CHECKING:
    from zoedge.noise.cache import NoiseCache

#: elements per CPU chunk (4 MiB of fp32), the unit of work of the parallel fill (and, for ``mt19937``, of seeding):
#: large enough that a chunk's overhead costs nothing measurable, small enough that a block's tensors split
#: across threads
CHUNK = 1 << 20
#: fewer elements than this in one fill (or one batch of fills) are drawn on the calling thread alone: handing them
#: to other threads would cost more than it saves
MIN_PARALLEL = 1 << 18


def stream_seed(run_seed: int, step: int, name: str, stream: str) -> int:
    """The generator seed of one draw (see the module docstring)."""
    digest = hashlib.sha256(f"zoedge/{run_seed}/{step}/{stream}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of a draw whose stream seed is ``seed`` (chunk 0: ``seed``)."""
    if chunk == 0:
        return seed
    digest = hashlib.sha256(f"zoedge-chunk/{seed}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _Job(NamedTuple):
    """Chunk ``k`` of a CPU draw into contiguous 1-D ``flat``."""

    flat: torch.Tensor
    seed: int        # the draw's stream seed
    k: int
    kind: str        # what :func:`_draw_` fills: normal, uniform or rademacher
    generator: str   # :data:`GENERATORS`

    @property
    def size(self) -> int:
        return min(CHUNK, self.flat.numel() - self.k * CHUNK)

    @property
    def on_kernel(self) -> bool:
        """Drawn straight into its target by the Philox kernel (fp32; other dtypes round an fp32 draw)."""
        return self.generator == "philox" and self.flat.dtype == torch.float32


class _Chunks:
    """Fills the chunks of CPU draws on the intra-op threads (one ``mt19937`` generator per worker thread).

    Draws queued inside :func:`batched_draws` (:meth:`NoiseDraw.queue`) are drawn together when the block ends,
    so that a block of tensors each smaller than one chunk still fills on all the threads.
    """

    def __init__(self) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.workers = 0
        self.local = threading.local()
        self.queue: list[_Job] | None = None  # batched
        self.after: list[Callable[[], None]] = []  # ... run once the queue is drawn
        self.batched_seconds = 0.0  # wall time spent drawing batches (and their ``then``s), for ``zoedge bench``

    def _gen(self) -> torch.Generator:
        gen = getattr(self.local, "gen", None)
        if gen is None:
            gen = self.local.gen = torch.Generator()
        return gen

    def _one(self, job: _Job) -> None:
        part = job.flat[job.k * CHUNK:(job.k + 1) * CHUNK]
        if job.generator == "philox":
            philox.fill_(part, job.seed, job.k * CHUNK, job.kind)
        else:
            _draw_(part, self._gen().manual_seed(chunk_seed(job.seed, job.k)), job.kind)

    def fill(self, flat: torch.Tensor, seed: int, kind: str, generator: str, then: Callable[[], None] | None = None,
             defer: bool = False) -> None:
        """Draw every chunk of contiguous 1-D ``flat``, then call ``then``; ``defer``: when the open
        :func:`batched_draws` block ends instead."""
        jobs = [_Job(flat, seed, k, kind, generator) for k in range((flat.numel() + CHUNK - 1) // CHUNK)]
        if defer:
            if self.queue is None:
                raise RuntimeError("a deferred draw outside a batched_draws() block")
            self.queue += jobs
            if then is not None:
                self.after.append(then)
            return
        self.run(jobs)
        if then is not None:
            then()

    def run(self, jobs: list[_Job]) -> None:
        """Draw ``jobs``. Where the Philox kernel was built with OpenMP, its jobs are drawn in small pieces on
        torch's own intra-op threads (:func:`~zoedge.noise.philox.fill_many`). The others: on the calling thread
        and ``threads - 1`` pool workers, each taking the next job (largest first) until none is left; on the
        calling thread alone when they are few elements in all."""
        if philox.parallel():
            kernel = [job for job in jobs if job.on_kernel]
            many = sum(job.size for job in kernel) >= MIN_PARALLEL
            philox.fill_many([(job.flat[job.k * CHUNK:(job.k + 1) * CHUNK], job.seed, job.k * CHUNK, job.kind)
                              for job in kernel], torch.get_num_threads() if many else 1)
            jobs = [job for job in jobs if not job.on_kernel]
            if not jobs:
                return
        threads = min(torch.get_num_threads(), len(jobs))
        if threads <= 1 or sum(job.size for job in jobs) < MIN_PARALLEL:
            for job in jobs:
                self._one(job)
            return
        if self.pool is None or self.workers < threads - 1:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            self.pool, self.workers = ThreadPoolExecutor(threads - 1, thread_name_prefix="zoedge-noise"), threads - 1
        jobs = sorted(jobs, key=lambda job: -job.size)
        taken = itertools.count()  # next() on a count is atomic under the GIL: each job is taken once

        def work() -> None:
            while (i := next(taken)) < len(jobs):
                self._one(jobs[i])

        helpers = [self.pool.submit(work) for _ in range(threads - 1)]
        work()
        for f in helpers:
            f.result()


_CHUNKS = _Chunks()


@contextmanager
def batched_draws() -> Iterator[None]:
    """Draw the whole-tensor draws queued inside the block (:meth:`NoiseDraw.queue`) together when it ends: all
    their chunks in parallel on the intra-op threads. The values are those of unqueued draws (each chunk is a
    pure function of its seed); a queued target is filled only when the block ends. Nested blocks join the
    outermost one; other draws inside the block are made at once, as outside."""
    if _CHUNKS.queue is not None:
        yield
        return
    _CHUNKS.queue, _CHUNKS.after = [], []
    try:
        yield
        queue, after = _CHUNKS.queue, _CHUNKS.after
    finally:
        _CHUNKS.queue, _CHUNKS.after = None, []
    t0 = time.perf_counter()
    _CHUNKS.run(queue)
    for then in after:
        then()
    _CHUNKS.batched_seconds += time.perf_counter() - t0


def batched_draw_seconds() -> float:
    """Wall seconds this process spent drawing at the end of :func:`batched_draws` blocks (``zoedge bench`` adds
    them to the time of its noise source's calls, which only queue such draws)."""
    return _CHUNKS.batched_seconds


#: the ways a draw's values follow from its seed (see the module docstring); the first is the default
GENERATORS = ("philox", "mt19937")
#: torch's own generator (``mt19937``), as the MeZO paper's code draws its noise
TORCH_GENERATOR = GENERATORS[1]
#: the generator of a checkpoint that names none (written before there was a choice): torch's
LEGACY_GENERATOR = TORCH_GENERATOR


#: the bit pattern of the fp32 value 1.0 (a set sign bit makes it -1.0)
_ONE_F32 = 0x3F800000


def _draw_(part: torch.Tensor, gen: torch.Generator, kind: str) -> None:
    """Fill contiguous 1-D ``part`` from ``gen``: ``normal`` N(0, 1), ``uniform`` U[0, 1) or ``rademacher`` ±1."""
    if kind == "normal":
        part.normal_(generator=gen)
    elif kind == "uniform":
        part.uniform_(generator=gen)
    else:
        _rademacher_(part, gen)


def _rademacher_(part: torch.Tensor, gen: torch.Generator) -> None:
    """Fill contiguous 1-D ``part`` with ±1: bit 0 of each byte of 64-bit draws (1 → -1), 8 values per draw."""
    n = part.numel()
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=part.device).random_(generator=gen)  # 63 random bits each (bit 63 is 0)
    bits = words.view(torch.uint8)[:n]  # bit 0 of every byte is random, byte 7's included
    if part.dtype == torch.float32:  # sign bit from the draw, exponent of 1.0: three integer passes, no float math
        as_int = part.view(torch.int32)
        as_int.copy_(bits)
        as_int.bitwise_left_shift_(31).bitwise_or_(_ONE_F32)  # the shift keeps bit 0 alone
    else:
        part.copy_(bits.bitwise_and(1)).mul_(-2).add_(1)


class NoiseSource:
    """Draws standard-normal noise into caller-provided tensors, one generator per device.

    Args:
        run_seed: the run's seed.
        generator: how the values follow from the seeds (:data:`GENERATORS`).
    """

    def __init__(self, run_seed: int, generator: str = GENERATORS[0]) -> None:
        if generator not in GENERATORS:
            raise ValueError(f"unknown noise generator {generator!r}: use one of {', '.join(GENERATORS)}")
        self.run_seed = run_seed
        self.generator = generator
        self._generators: dict[torch.device, torch.Generator] = {}
        #: CPU draws of whole tensors are kept here within its budget and served from it when drawn again
        #: (:class:`~zoedge.noise.cache.NoiseCache`; None: every draw is drawn)
        self.cache: NoiseCache | None = None

    def _generator(self, device: torch.device, step: int, name: str, stream: str) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device)
        return gen.manual_seed(stream_seed(self.run_seed, step, name, stream))

    #: the variant's name (:data:`NOISE_KINDS`)
    kind: str = "gaussian"
    #: what its direction draw (:meth:`normal_`) fills chunks with (:func:`_draw_`)
    direction: str = "normal"
    #: True when :meth:`add_` costs no more than one pass over the tensor (no draw): then a plugin may skip
    #: materialising the noise in a workspace and form θ + αz straight from the source on every pass
    redraw_is_free: bool = False

    def _fill(self, out: torch.Tensor, step: int, name: str, stream: str, kind: str, defer: bool = False
              ) -> torch.Tensor:
        if out.is_meta:  # meta tensors hold no values (device-memory accounting): nothing to draw
            return out
        if out.device.type != "cpu":
            gen = self._generator(out.device, step, name, stream)
            if kind == "normal":
                return out.normal_(generator=gen)
            if kind == "uniform":
                return out.uniform_(generator=gen)
            return out.copy_(torch.randint(0, 2, out.shape, generator=gen, device=out.device,
                                           dtype=torch.int8)).mul_(-2).add_(1)
        cache = self.cache
        if cache is not None and cache.get(out, self.identity, step, name, stream, kind):
            return out
        # the values of the contiguous layout, so they do not depend on the target's strides
        target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype)

        def then() -> None:
            if target is not out:
                out.copy_(target)
            if cache is not None:
                cache.put(out, self.identity, step, name, stream, kind)

        _CHUNKS.fill(target.view(-1), stream_seed(self.run_seed, step, name, stream), kind, self.generator, then,
                     defer)
        return out

    def normal_(self, out: torch.Tensor, step: int, name: str, stream: str) -> torch.Tensor:
        """Fill ``out`` in place with N(0, 1) noise for (step, name, stream); returns ``out``."""
        return self._fill(out, step, name, stream, "normal")

    def uniform_(self, out: torch.Tensor, step: int, name: str, stream: str) -> torch.Tensor:
        """Fill ``out`` in place with U[0, 1) noise for (step, name, stream); returns ``out``."""
        return self._fill(out, step, name, stream, "uniform")

    def draw(self, step: int, name: str, stream: str) -> NoiseDraw:
        """The direction draw (this variant's :meth:`normal_`) of (step, name, stream) as a
        :data:`~zoedge.runtime.perturbed.Fill` that a block may also queue (:meth:`NoiseDraw.queue`)."""
        return NoiseDraw(self, step, name, stream)

    def _queue(self, out: torch.Tensor, step: int, name: str, stream: str) -> None:
        """Queue :meth:`normal_` of ``out`` in the open :func:`batched_draws` block (an accelerator draws at once)."""
        self._fill(out, step, name, stream, self.direction, defer=True)

    def _held(self, like: torch.Tensor, step: int, name: str, stream: str) -> torch.Tensor | None:
        """The cache's buffer for :meth:`normal_` of a CPU tensor like ``like``, shaped like it: holding the draw,
        or queued to be filled with it when the open :func:`batched_draws` block ends. None when there is no cache
        or the draw does not fit it. Read-only: it is the cache's own."""
        cache = self.cache
        if cache is None or like.device.type != "cpu":
            return None
        entry, held = cache.lend(like, self.identity, step, name, stream, self.direction)
        if entry is None:
            return None
        if not held:
            def then() -> None:
                entry.draw = (self.identity, step)
            _CHUNKS.fill(entry.buffer, stream_seed(self.run_seed, step, name, stream), self.direction, self.generator,
                         then, defer=True)
        return entry.buffer.view(like.shape)

    def normal(self, shape: tuple[int, ...], step: int, name: str, stream: str, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """Allocate and fill (for small factors and tests)."""
        return self.normal_(torch.empty(shape, dtype=dtype, device=device), step, name, stream)

    # ------------------------------------------------------------------ ranges (just-in-time perturbation)
    def normal_at_(self, out: torch.Tensor, step: int, name: str, stream: str, start: int = 0,
                   total: int | None = None) -> torch.Tensor:
        """Fill ``out`` with elements ``[start, start + out.numel())`` of the chunked N(0, 1) draw of a tensor of
        ``total`` elements (default: ``out``'s own) for (step, name, stream): a row range of a tensor's noise
        without drawing the rest (see :meth:`_fill_at`)."""
        return self._fill_at(out, step, name, stream, start, total, "normal")

    def uniform_at_(self, out: torch.Tensor, step: int, name: str, stream: str, start: int = 0,
                    total: int | None = None) -> torch.Tensor:
        """As :meth:`normal_at_`, U[0, 1) noise."""
        return self._fill_at(out, step, name, stream, start, total, "uniform")

    def _fill_at(self, out: torch.Tensor, step: int, name: str, stream: str, start: int, total: int | None,
                 kind: str) -> torch.Tensor:
        """A range of a draw. On the CPU, the values of :meth:`normal_` / :meth:`uniform_` of the whole tensor:
        ``philox`` computes just the range; ``mt19937`` draws each chunk that overlaps it whole and keeps the
        part inside. Elsewhere, the chunked draw: chunk ``k`` (:data:`CHUNK` elements of the flat layout, the last
        one shorter) is drawn whole with a generator seeded ``chunk_seed(stream_seed(...), k)``, and the part
        inside the range is kept; those values differ from the whole-tensor draw (one generator for the whole
        target), so a tensor's draws must all go through the ``_at_`` form there. On the meta device the same
        buffers are allocated and nothing is drawn (device-memory accounting)."""
        n = out.numel()
        total = n if total is None else total
        if start < 0 or start + n > total:
            raise ValueError(f"range [{start}, {start + n}) outside a draw of {total} elements")
        if out.device.type == "cpu" and start == 0 and n == total:
            return self._fill(out, step, name, stream, kind)  # the whole tensor: the parallel chunked fill
        flat = out.view(-1) if out.is_contiguous() else torch.empty(n, dtype=out.dtype, device=out.device)
        seed = stream_seed(self.run_seed, step, name, stream)
        if out.device.type == "cpu" and self.generator == "philox":
            philox.fill_(flat, seed, start, kind)
            if not out.is_contiguous():
                out.copy_(flat.view(out.shape))
            return out
        gen = None if out.is_meta else self._generators.setdefault(out.device, torch.Generator(out.device))
        k = start // CHUNK
        while k * CHUNK < start + n:
            lo, hi = k * CHUNK, min((k + 1) * CHUNK, total)           # the chunk, in the tensor's flat layout
            a, b = max(lo, start), min(hi, start + n)                   # ... the part inside the range
            whole = a == lo and b == hi
            part = flat[a - start:b - start] if whole else torch.empty(hi - lo, dtype=out.dtype, device=out.device)
            if gen is not None:
                _draw_(part, gen.manual_seed(chunk_seed(seed, k)), kind)
            if not whole:
                flat[a - start:b - start].copy_(part[a - lo:b - lo])
            k += 1
        if not out.is_contiguous():
            out.copy_(flat.view(out.shape))
        return out

    def describe(self) -> dict[str, str]:
        """Variant, generator and how CPU draws were computed (``native``: the C kernel; ``unused``: no CPU draw
        in this process, e.g. a run on an accelerator) and by which kernel (:func:`~zoedge.noise.philox.kernel`:
        the one built at install time, or at first use), for run summaries."""
        philox_cpu = self.generator == "philox"
        return {"kind": self.kind, "generator": self.generator,
                "cpu_backend": philox.backend(load=False) if philox_cpu else "torch",
                "cpu_kernel": philox.kernel() if philox_cpu else None}

    @property
    def identity(self) -> tuple[str, int]:
        """What a draw's values depend on besides (step, name, stream, kind): (generator, run seed)."""
        return self.generator, self.run_seed

    def reseeded(self, run_seed: int, generator: str | None = None) -> NoiseSource:
        """The same variant (and options, and cache) for another run seed and/or generator (default: this one's);
        ``self`` when neither changes."""
        generator = self.generator if generator is None else generator
        if (generator, run_seed) == self.identity:
            return self
        other = self._with_seed(run_seed, generator)
        other.cache = self.cache  # its entries carry their source's identity: another's never match
        return other

    def _with_seed(self, run_seed: int, generator: str) -> NoiseSource:
        return type(self)(run_seed, generator)

    def add_(self, out: torch.Tensor, theta: torch.Tensor, alpha: float, step: int, name: str, stream: str,
             buffer: torch.Tensor | None = None, start: int = 0, total: int | None = None) -> torch.Tensor:
        """``out = theta + alpha * z`` with z elements ``[start, start + theta.numel())`` of this source's
        ``normal_`` noise for (step, name, stream) of a tensor of ``total`` elements (default: ``theta``'s own).

        ``out`` may be ``theta`` (in place). This class draws z into ``buffer`` (shaped like ``theta``; allocated
        when None) and adds it; :class:`PoolNoise` reads its pool directly. Returns ``out``.
        """
        z = self.normal_at_(torch.empty_like(theta) if buffer is None else buffer, step, name, stream, start, total)
        return torch.add(theta, z, alpha=alpha, out=out)


class RademacherNoise(NoiseSource):
    """Independent ±1 noise (mean 0, variance 1) in place of N(0, 1): see the module docstring."""

    kind = "rademacher"
    direction = "rademacher"

    def normal_(self, out: torch.Tensor, step: int, name: str, stream: str) -> torch.Tensor:
        """Fill ``out`` with ±1 noise for (step, name, stream) (chunked and thread-count independent on the CPU)."""
        return self._fill(out, step, name, stream, "rademacher")

    def normal_at_(self, out: torch.Tensor, step: int, name: str, stream: str, start: int = 0,
                   total: int | None = None) -> torch.Tensor:
        """Elements ``[start, start + out.numel())`` of the ±1 draw (see :meth:`NoiseSource.normal_at_`)."""
        return self._fill_at(out, step, name, stream, start, total, "rademacher")


#: default pool length of :class:`PoolNoise` (16 MiB of fp32)
POOL_SIZE = 1 << 22


def flat_spectrum_pool(seed: int, size: int) -> torch.Tensor:
    """``size`` fp32 values with zero mean, unit mean square and circular autocorrelation -1/(size-1) at every
    non-zero lag: a normal draw whose real FFT keeps its phases, with every magnitude set to one and the DC
    term to zero (see the module docstring)."""
    if size < 2 or size % 2:
        raise ValueError(f"pool size must be an even number >= 2, got {size}")
    x = torch.empty(size, dtype=torch.float64).normal_(generator=torch.Generator().manual_seed(seed))
    spec = torch.fft.rfft(x)
    spec = spec / spec.abs().clamp_min(1e-300)
    spec[0] = 0.0
    spec[-1] = spec[-1].real.sign()  # the Nyquist term of a real signal is real: ±1
    pool = torch.fft.irfft(spec, n=size)
    pool -= pool.mean()
    pool /= pool.square().mean().sqrt()
    return pool.float()


class PoolNoise(NoiseSource):
    """Noise read from one pre-drawn pool at per-segment random offsets: see the module docstring.

    Args:
        run_seed: the run's seed (the pool and every offset derive from it).
        size: pool length (even, at least :data:`CHUNK`; memory: ``size + CHUNK`` values per device and dtype).
        generator: recorded for checkpoints; the pool and its offsets are drawn by torch's generator either way.
    """

    kind = "pool"
    redraw_is_free = True

    def __init__(self, run_seed: int, size: int = POOL_SIZE, *, generator: str = GENERATORS[0]) -> None:
        super().__init__(run_seed, generator)
        if size < CHUNK or size % 2:
            raise ValueError(f"pool size must be an even number >= {CHUNK}, got {size}")
        self.size = size
        self._pools: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _with_seed(self, run_seed: int, generator: str) -> NoiseSource:
        return PoolNoise(run_seed, self.size, generator=generator)

    def pool(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The pool followed by a copy of its first :data:`CHUNK` values (so every window is contiguous)."""
        key = (torch.device(device), dtype)
        if key not in self._pools:
            base = flat_spectrum_pool(stream_seed(self.run_seed, -1, "pool", "pool"), self.size)
            self._pools[key] = torch.cat([base, base[:CHUNK]]).to(device=key[0], dtype=dtype)
        return self._pools[key]

    def offsets(self, step: int, name: str, stream: str, numel: int) -> list[int]:
        """Pool offset of each :data:`CHUNK`-element segment of a draw (uniform in [0, size))."""
        gen = torch.Generator().manual_seed(stream_seed(self.run_seed, step, name, stream))
        return torch.randint(0, self.size, ((numel + CHUNK - 1) // CHUNK,), generator=gen).tolist()

    def _windows(self, like: torch.Tensor, step: int, name: str, stream: str):
        pool, n = self.pool(like.device, like.dtype), like.numel()
        for k, off in enumerate(self.offsets(step, name, stream, n)):
            lo, hi = k * CHUNK, min(n, (k + 1) * CHUNK)
            yield lo, hi, pool[off:off + hi - lo]

    def _queue(self, out: torch.Tensor, step: int, name: str, stream: str) -> None:
        self.normal_(out, step, name, stream)  # copies, nothing to draw: at once

    def _held(self, like: torch.Tensor, step: int, name: str, stream: str) -> torch.Tensor | None:
        return None  # nothing to keep: a draw is a copy of pool windows

    def normal_(self, out: torch.Tensor, step: int, name: str, stream: str) -> torch.Tensor:
        """Copy this draw's pool windows into ``out`` (values of its contiguous layout, like the other kinds)."""
        flat = out.view(-1) if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device).view(-1)
        for lo, hi, window in self._windows(out, step, name, stream):
            flat[lo:hi].copy_(window)
        if not out.is_contiguous():
            out.copy_(flat.view(out.shape))
        return out

    def normal_at_(self, out: torch.Tensor, step: int, name: str, stream: str, start: int = 0,
                   total: int | None = None) -> torch.Tensor:
        """Elements ``[start, start + out.numel())`` of the draw of a tensor of ``total`` elements (default:
        ``out``'s own): the same values as :meth:`normal_` of the whole tensor, copied from the pool windows."""
        n = out.numel()
        total = n if total is None else total
        if start < 0 or start + n > total:
            raise ValueError(f"range [{start}, {start + n}) outside a draw of {total} elements")
        if out.is_meta:
            return out
        flat = out.view(-1) if out.is_contiguous() else torch.empty(n, dtype=out.dtype, device=out.device)
        pool = self.pool(out.device, out.dtype)
        for k, off in enumerate(self.offsets(step, name, stream, total)):
            lo, hi = k * CHUNK, min(total, (k + 1) * CHUNK)
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                flat[a - start:b - start].copy_(pool[off + a - lo:off + b - lo])
        if not out.is_contiguous():
            out.copy_(flat.view(out.shape))
        return out

    def add_(self, out: torch.Tensor, theta: torch.Tensor, alpha: float, step: int, name: str, stream: str,
             buffer: torch.Tensor | None = None, start: int = 0, total: int | None = None) -> torch.Tensor:
        """``out = theta + alpha * z`` reading the pool windows directly: one pass, no draw, no buffer."""
        if not (out.is_contiguous() and theta.is_contiguous()):
            return super().add_(out, theta, alpha, step, name, stream, buffer, start, total)
        n = theta.numel()
        total = n if total is None else total
        if start < 0 or start + n > total:
            raise ValueError(f"range [{start}, {start + n}) outside a draw of {total} elements")
        o, t, pool = out.view(-1), theta.view(-1), self.pool(theta.device, theta.dtype)
        for k, off in enumerate(self.offsets(step, name, stream, total)):
            lo, hi = k * CHUNK, min(total, (k + 1) * CHUNK)
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                torch.add(t[a - start:b - start], pool[off + a - lo:off + b - lo], alpha=alpha,
                          out=o[a - start:b - start])
        return out


class NoiseDraw:
    """One direction draw (source, step, tensor, stream) as a :data:`~zoedge.runtime.perturbed.Fill`: called, it
    fills any range of the tensor's noise at once; :meth:`queue` fills a whole tensor when the open
    :func:`batched_draws` block ends (the runtime queues a block's draws so that they fill in parallel)."""

    __slots__ = ("source", "step", "name", "stream")

    def __init__(self, source: NoiseSource, step: int, name: str, stream: str) -> None:
        self.source, self.step, self.name, self.stream = source, step, name, stream

    def __call__(self, out: torch.Tensor, start: int, total: int) -> torch.Tensor:
        return self.source.normal_at_(out, self.step, self.name, self.stream, start, total)

    def queue(self, out: torch.Tensor) -> None:
        """Fill all of ``out`` (shaped like the tensor) when the open :func:`batched_draws` block ends."""
        self.source._queue(out, self.step, self.name, self.stream)

    @property
    def free(self) -> bool:
        """Whether :meth:`add_` forms θ + αz without drawing z (the source's ``redraw_is_free``)."""
        return self.source.redraw_is_free

    def add_(self, out: torch.Tensor, theta: torch.Tensor, alpha: float, start: int = 0, total: int | None = None
             ) -> torch.Tensor:
        """``out = theta + alpha * z``, z elements ``[start, start + theta.numel())`` of the draw (see
        :meth:`NoiseSource.add_`)."""
        return self.source.add_(out, theta, alpha, self.step, self.name, self.stream, start=start, total=total)

    def held(self, like: torch.Tensor) -> torch.Tensor | None:
        """The draw in the noise cache's own buffer, shaped like ``like`` (filled when the open
        :func:`batched_draws` block ends if it was not kept yet): read it there instead of copying it; None when the
        source has no cache for it. Read-only."""
        return self.source._held(like, self.step, self.name, self.stream)


#: the named noise variants (see the module docstring)
NOISE_KINDS: dict[str, type[NoiseSource]] = {"gaussian": NoiseSource, "rademacher": RademacherNoise,
                                             "pool": PoolNoise}


def make_noise(kind: str, run_seed: int) -> NoiseSource:
    """The noise source of variant ``kind`` for a run.

    Raises:
        ValueError: an unknown kind (the plugin turns it into an error naming its option).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise {kind!r}: use one of {', '.join(NOISE_KINDS)}")
    return NOISE_KINDS[kind](run_seed)
