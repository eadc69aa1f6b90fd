#!/usr/bin/env python
"""What checking a store on load costs, against one forward pass of the same model.

Times, on a prepared store of the default model (SmolLM2-135M-Instruct, fp32) or ``--store``:

* ``first load``: :func:`~zoedge.store.manifest.load_manifest` with no stamps (every block hashed: what the
  first process to use a store pays; the page cache is warm, so this is hashing, not disk);
* ``stamped load``: the same with the stamps the first load recorded (a stat per block, no hashing: what every
  later process pays) -- target: at most 5% of a forward pass;
* ``checks only``: ``load_manifest(verify=False)`` (manifest parse, layout and config cross-checks);
* ``forward``: one streamed forward of a ``--batch`` x ``--seq`` batch (ram tier, ``--device``).

Each is the median of ``--repeat`` runs; ratios are against the forward pass of the same run.

Examples::

    python tools/bench_verify.py                  # default model, CPU, 8x64
    python tools/bench_verify.py --store STORE --device cuda
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import zoedge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import zoedge
import zoedge.store.verify as verify
from zoedge.store.manifest import load_manifest

TARGET = 0.05


def median_s(fn, repeat: int, before=None, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=None, help="a prepared store (default: prepare the default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)

    tmp = None
    store = args.store
    if store is None:
        from zoedge.models import default_model_dir
        tmp = tempfile.TemporaryDirectory(prefix="zoedge-bench-verify-")
        store = Path(tmp.name) / "store"
        zoedge.prepare(default_model_dir(), store, dtype="fp32", progress=False, log=lambda s: None)
        # stamps of files changed within RACY_NS of hashing are not trusted: let the fresh store age first
        time.sleep(verify.RACY_NS / 1e9 + 0.5)
    manifest = load_manifest(store, verify=False)
    size = manifest.nbytes

    def forget() -> None:
        verify._MEMORY.clear()
        for f in verify._stamp_files(store):
            f.unlink(missing_ok=True)

    first = median_s(lambda: load_manifest(store), args.repeat, before=forget)
    stamped = median_s(lambda: load_manifest(store), args.repeat, before=verify._MEMORY.clear)
    stamped_cpu = median_s(lambda: load_manifest(store), args.repeat, before=verify._MEMORY.clear,
                           clock=time.process_time)
    checks = median_s(lambda: load_manifest(store, verify=False), args.repeat)

    model = zoedge.load(store, device=args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(model.device)
    mask = torch.ones_like(ids)

    def forward() -> None:
        with torch.no_grad():
            model(ids, mask)
        model.synchronize()

    forward()  # warm-up
    fwd = median_s(forward, args.repeat)
    model.close()
    if tmp is not None:
        tmp.cleanup()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"store {store} ({len(manifest.blocks)} blocks, {size / 2**20:.0f} MiB, {manifest.dtype})")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}; "
          f"device {args.device}; batch {args.batch}x{args.seq}; median of {args.repeat}")
    print(f"forward pass      {fwd * 1e3:9.1f} ms")
    print(f"first load        {first * 1e3:9.1f} ms  ({first / fwd:6.1%} of a pass; "
          f"{size / 2**20 / first:.0f} MiB/s hashed)")
    print(f"stamped load      {stamped * 1e3:9.1f} ms  ({stamped / fwd:6.1%} of a pass; "
          f"{stamped_cpu * 1e3:.1f} ms of CPU time, what it costs on an idle core)")
    print(f"  of which checks {checks * 1e3:9.1f} ms  (manifest parse, layout and config cross-checks)")
    ok = stamped / fwd <= TARGET
    print(f"stamped load / forward = {stamped / fwd:.3f}: {'within' if ok else 'ABOVE'} the {TARGET:.0%} target")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
