"""Counter-based noise: every draw is a pure function of (run seed, step, tensor name, stream).

``stream_seed(run_seed, step, name, stream)`` is the first 63 bits of
``sha256(f"zoedge/{run_seed}/{step}/{stream}/{name}")``. On the CPU a target is
filled in chunks of :data:`CHUNK` elements (of its flattened, contiguous
layout); chunk ``k`` gets its own generator seeded with
``chunk_seed(stream_seed(...), k)`` (chunk 0 uses the stream seed itself), so the
chunks are drawn in parallel on the intra-op threads and the values do not
depend on how many threads there are. On an accelerator a draw re-seeds one
reusable ``torch.Generator`` with the stream seed and fills the whole target.
Consequences:

* a tensor's noise does not depend on the order blocks are visited in, nor on
  what else was drawn before (each draw starts a fresh generator state);
* independent objects use distinct ``stream`` labels (``"z0"``, ``"z1"`` for
  directions, ``"U"`` / ``"V"`` for low-rank factors), so redrawing one never
  shifts another;
* values are reproducible per device type and dtype: CPU and CUDA generators
  produce different numbers for the same seed, and a bf16 target is filled
  directly in bf16 (not an fp32 draw rounded).
"""
from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

#: elements per independently seeded CPU chunk (4 MiB of fp32): large enough that seeding a generator per chunk
#: costs nothing measurable, small enough that a block's tensors split across threads
CHUNK = 1 << 20


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


class _Chunks:
    """Fills the chunks of CPU draws on the intra-op threads (one generator per worker thread)."""

    def __init__(self) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.workers = 0
        self.local = threading.local()

    def _gen(self) -> torch.Generator:
        gen = getattr(self.local, "gen", None)
        if gen is None:
            gen = self.local.gen = torch.Generator()
        return gen

    def fill(self, flat: torch.Tensor, seed: int, kind: str) -> None:
        n = flat.numel()
        chunks = range((n + CHUNK - 1) // CHUNK)

        def one(k: int) -> None:
            part = flat[k * CHUNK:(k + 1) * CHUNK]
            gen = self._gen().manual_seed(chunk_seed(seed, k))
            part.normal_(generator=gen) if kind == "normal" else part.uniform_(generator=gen)

        threads = min(torch.get_num_threads(), len(chunks))
        if threads <= 1:
            for k in chunks:
                one(k)
            return
        if self.pool is None or self.workers < threads:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            self.pool, self.workers = ThreadPoolExecutor(threads, thread_name_prefix="zoedge-noise"), threads
        for f in [self.pool.submit(one, k) for k in chunks]:
            f.result()


_CHUNKS = _Chunks()


class NoiseSource:
    """Draws standard-normal noise into caller-provided tensors, one generator per device.

    Args:
        run_seed: the run's seed.
    """

    def __init__(self, run_seed: int) -> None:
        self.run_seed = run_seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, step: int, name: str, stream: str) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device)
        return gen.manual_seed(stream_seed(self.run_seed, step, name, stream))

    def _fill(self, out: torch.Tensor, step: int, name: str, stream: str, kind: str) -> torch.Tensor:
        if out.device.type != "cpu":
            gen = self._generator(out.device, step, name, stream)
            return out.normal_(generator=gen) if kind == "normal" else out.uniform_(generator=gen)
        seed = stream_seed(self.run_seed, step, name, stream)
        if out.is_contiguous():
            _CHUNKS.fill(out.view(-1), seed, kind)
        else:  # the values of the contiguous layout, so they do not depend on the target's strides
            tmp = torch.empty(out.shape, dtype=out.dtype)
            _CHUNKS.fill(tmp.view(-1), seed, kind)
            out.copy_(tmp)
        return out

    def normal_(self, out: torch.Tensor, step: int, name: str, stream: str) -> torch.Tensor:
        """Fill ``out`` in place with N(0, 1) noise for (step, name, stream); returns ``out``."""
        return self._fill(out, step, name, stream, "normal")

    def uniform_(self, out: torch.Tensor, step: int, name: str, stream: str) -> torch.Tensor:
        """Fill ``out`` in place with U[0, 1) noise for (step, name, stream); returns ``out``."""
        return self._fill(out, step, name, stream, "uniform")

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
        """The chunked draw on every device: chunk ``k`` (:data:`CHUNK` elements of the flat layout, the last one
        shorter) is drawn whole with a generator seeded ``chunk_seed(stream_seed(...), k)``, and the part inside
        the range is kept. On the CPU the values equal :meth:`normal_` / :meth:`uniform_` of the whole tensor
        (which draws the same chunks); on an accelerator they differ from those (which fill the whole target
        from one generator), so a tensor's draws must all go through the ``_at_`` form there. On the meta
        device the same buffers are allocated and nothing is drawn (device-memory accounting)."""
        n = out.numel()
        total = n if total is None else total
        if start < 0 or start + n > total:
            raise ValueError(f"range [{start}, {start + n}) outside a draw of {total} elements")
        if out.device.type == "cpu" and start == 0 and n == total:
            return self._fill(out, step, name, stream, kind)  # the whole tensor: the parallel chunked fill
        flat = out.view(-1) if out.is_contiguous() else torch.empty(n, dtype=out.dtype, device=out.device)
        seed = stream_seed(self.run_seed, step, name, stream)
        gen = None if out.is_meta else self._generators.setdefault(out.device, torch.Generator(out.device))
        k = start // CHUNK
        while k * CHUNK < start + n:
            lo, hi = k * CHUNK, min((k + 1) * CHUNK, total)           # the chunk, in the tensor's flat layout
            a, b = max(lo, start), min(hi, start + n)                   # ... the part inside the range
            whole = a == lo and b == hi
            part = flat[a - start:b - start] if whole else torch.empty(hi - lo, dtype=out.dtype, device=out.device)
            if gen is not None:
                gen.manual_seed(chunk_seed(seed, k))
                part.normal_(generator=gen) if kind == "normal" else part.uniform_(generator=gen)
            if not whole:
                flat[a - start:b - start].copy_(part[a - lo:b - lo])
            k += 1
        if not out.is_contiguous():
            out.copy_(flat.view(out.shape))
        return out
