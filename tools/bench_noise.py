"""Chunked counter-based noise: time to fill N fp32 values with 1 thread and with T threads, alternating, same run.

    nice python tools/bench_noise.py --numel 134515008 --threads 2 --repeat 5

(134515008 = the parameters of SmolLM2-135M.) Prints the median time per fill for each thread count and the
speed-up; the values are checked to be bit-identical.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from zoedge.optim.noise import NoiseSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=134_515_008)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    out = torch.empty(args.numel)
    src = NoiseSource(0)
    times: dict[int, list[float]] = {1: [], args.threads: []}
    ref = None
    for r in range(args.repeat):
        for n in ((1, args.threads) if r % 2 == 0 else (args.threads, 1)):
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            src.normal_(out, 0, "w", "z0")
            times[n].append(time.perf_counter() - t0)
            head = out[:1000].clone()
            ref = head if ref is None else ref
            assert torch.equal(head, ref)
    one, many = statistics.median(times[1]), statistics.median(times[args.threads])
    print(f"{args.numel} fp32 normals: 1 thread {one:.3f} s, {args.threads} threads {many:.3f} s, "
          f"speed-up {one / many:.2f}x ({args.repeat} alternating rounds)")


if __name__ == "__main__":
    main()
