"""Noise variants and generators: time to fill N fp32 values with 1 thread and with T threads, alternating.

    nice python tools/bench_noise.py --numel 134515008 --threads 2 --repeat 5

(134515008 = the parameters of SmolLM2-135M.) For each variant of :mod:`zoedge.noise.source` (``gaussian``,
``rademacher``, ``pool``) and each generator (``philox``: zoedge's C kernel; ``mt19937``: torch's generator)
prints the median time of ``normal_`` (materialising the noise) per thread count, in ns per value, and the
speed-up, and, as the yardstick every variant pays anyway, one ``out = θ + εz`` pass (``add_``: for ``pool``
read straight from the pool, which is all a pool step costs; for the others the pass alone, after the draw).
The values are checked to be bit-identical across thread counts. Last, the torch implementation of the Philox
kernel (the fallback without a C compiler) on 2^22 values, one thread.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from zoedge.noise import philox
from zoedge.noise.source import GENERATORS, NOISE_KINDS, make_noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=134_515_008)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kinds", default=",".join(NOISE_KINDS), help="comma-separated variants (default: all)")
    ap.add_argument("--generators", default=",".join(GENERATORS), help="comma-separated (default: all)")
    args = ap.parse_args()
    out, theta = torch.empty(args.numel), torch.randn(args.numel)
    counts = (1, args.threads) if args.threads != 1 else (1,)
    print(f"Philox kernel: {philox.backend()}{' (OpenMP)' if philox.parallel() else ''}", flush=True)
    for kind, generator in ((k, g) for k in args.kinds.split(",") for g in args.generators.split(",")):
        if kind == "pool" and generator != GENERATORS[0]:
            continue  # the pool is drawn once per run: the generator does not matter
        src = make_noise(kind, 0).reseeded(0, generator)
        src.normal_(torch.empty(16), 0, "warm", "z0")  # a pool is built here, not in the timings
        fill: dict[int, list[float]] = {n: [] for n in counts}
        add: dict[int, list[float]] = {n: [] for n in counts}
        ref = None
        for r in range(args.repeat):
            for n in (counts if r % 2 == 0 else counts[::-1]):
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                src.normal_(out, 0, "w", "z0")
                fill[n].append(time.perf_counter() - t0)
                head = out[:1000].clone()
                ref = head if ref is None else ref
                assert torch.equal(head, ref), (kind, n)
                t0 = time.perf_counter()
                if src.redraw_is_free:
                    src.add_(out, theta, 1e-3, 0, "w", "z0")
                else:
                    torch.add(theta, out, alpha=1e-3, out=out)
                add[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(v) for n, v in fill.items()}
        line = f"{kind:10s} {generator:8s} normal_: " + ", ".join(
            f"{n} thread(s) {med[n]:.3f} s ({med[n] / args.numel * 1e9:.2f} ns/value)" for n in counts)
        if len(counts) > 1:
            line += f", speed-up {med[1] / med[args.threads]:.2f}x"
        line += "; θ+εz pass: " + ", ".join(f"{n} thread(s) {statistics.median(add[n]):.3f} s" for n in counts)
        print(f"{line}  ({args.numel} fp32 values, {args.repeat} alternating rounds)", flush=True)
    torch.set_num_threads(1)
    small = torch.empty(1 << 22)
    t0 = time.perf_counter()
    philox.reference_fill_(small, 1)
    print(f"Philox in torch operations (the fallback): {(time.perf_counter() - t0) / small.numel() * 1e9:.1f} "
          "ns/value, 1 thread", flush=True)


if __name__ == "__main__":
    main()
