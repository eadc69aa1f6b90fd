#!/usr/bin/env python
"""Direct vs buffered disk I/O of one block, as the disk tier's I/O thread does it, in the same run.

One block file of ``--bytes`` (default 809,533,440: a Llama-2-7B fp32 decoder layer) is read into a page-aligned
buffer and written back in place, ``--repeat`` times per mode, the modes alternating (their order swapped every
repeat, so a drifting disk biases neither):

* ``buffered``: what the disk tier did before direct I/O when the blocks exceed memory (``drop_cache``): a
  ``readinto`` through the page cache, then its pages dropped; a write through the page cache, then
  ``fdatasync`` and the pages dropped;
* ``direct``: ``O_DIRECT`` (the disk tier's default with ``drop_cache``): the bytes move between the disk and the
  buffer without the page cache.

Each operation runs on a separate thread (as on the tier's I/O thread) and reports its wall time and the CPU
time of that thread (``time.thread_time``: user + system time spent in that thread, including the kernel's page
copies and, for ``fdatasync``, the writeback it starts). Medians are printed with the direct / buffered ratios.
The buffered read starts cold: the file's pages are dropped before it (a buffered write-back leaves none).

The file goes in ``--dir`` (default: a temporary directory under the current one, removed afterwards; /tmp may
be a tmpfs, which does not test a disk).

Example::

    nice python tools/bench_disk_io.py --json disk_io.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

try:
    import zoedge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from zoedge.runtime.host import _drop_pages, probe_direct_io, read_file_into, write_file_from
from zoedge.memory import page_aligned

LAYER_7B = 4 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096)  # fp32 bytes of one Llama-2-7B decoder layer
MODES = {"buffered": False, "direct": True}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bytes", type=int, default=LAYER_7B, help=f"block size (default {LAYER_7B}: a 7B fp32 layer)")
    p.add_argument("--repeat", type=int, default=3, help="reads and write-backs per mode (default 3)")
    p.add_argument("--dir", type=Path, default=None, help="where the block file goes (a real disk)")
    p.add_argument("--json", type=Path, default=None, help="write the measurements here")
    return p.parse_args(argv)


def uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def filesystem(path: Path) -> str:
    """The type of the filesystem mounted deepest above ``path`` (from /proc/mounts)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def timed(io: ThreadPoolExecutor, fn: Callable[[], None]) -> tuple[float, float]:
    """(wall s, CPU s of the thread) of ``fn`` run on the I/O thread."""
    def run() -> tuple[float, float]:
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        return time.perf_counter() - t0, time.thread_time() - c0

    return io.submit(run).result()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    own_dir = args.dir is None
    work = Path(tempfile.mkdtemp(prefix="bench_disk_io-", dir=Path.cwd())) if own_dir else args.dir
    work.mkdir(parents=True, exist_ok=True)
    path = work / "block.bin"
    try:
        if not probe_direct_io(work / "probe"):
            raise SystemExit(f"{work} ({filesystem(work)}) refuses O_DIRECT: pass --dir on a disk filesystem")
        buf = page_aligned(args.bytes)
        buf[: args.bytes // 8 * 8].view(torch.int64).copy_(torch.arange(args.bytes // 8))  # any bytes will do
        write_file_from(path, buf, drop_cache=True)  # the block file, flushed, no pages cached
        load_start = uptime()
        runs: dict[str, dict[str, list[float]]] = {m: {"read_s": [], "read_cpu_s": [], "write_s": [],
                                                      "write_cpu_s": []} for m in MODES}
        with ThreadPoolExecutor(1, thread_name_prefix="io") as io:
            for rep in range(args.repeat):
                for mode in (list(MODES) if rep % 2 == 0 else list(MODES)[::-1]):
                    direct, r = MODES[mode], runs[mode]
                    with open(path, "rb") as f:  # cold: no page of the file cached
                        _drop_pages(f.fileno())
                    wall, cpu = timed(io, lambda: read_file_into(path, buf, drop_cache=True, direct=direct))
                    r["read_s"].append(wall)
                    r["read_cpu_s"].append(cpu)
                    wall, cpu = timed(io, lambda: write_file_from(path, buf, drop_cache=True, direct=direct))
                    r["write_s"].append(wall)
                    r["write_cpu_s"].append(cpu)
        check = page_aligned(args.bytes)
        read_file_into(path, check, direct=True)
        if not torch.equal(check, buf):
            raise SystemExit("the file read back differs from what was written")
    finally:
        path.unlink(missing_ok=True)
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)

    med = {m: {k: statistics.median(v) for k, v in r.items()} for m, r in runs.items()}
    ratio = {k: med["direct"][k] / med["buffered"][k] if med["buffered"][k] > 0 else None for k in med["direct"]}
    result = {"bytes": args.bytes, "repeat": args.repeat, "dir": str(work), "filesystem": filesystem(work),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
              "loadavg_start": load_start, "loadavg_end": uptime(), "median": med, "direct_over_buffered": ratio,
              "runs": runs}
    mb = args.bytes / 1e6
    print(f"{args.bytes} bytes ({mb:.0f} MB), {args.repeat} repeats, {result['filesystem']} at {work}, "
          f"{os.cpu_count()} CPUs, load {load_start} -> {result['loadavg_end']}")
    print(f"{'':10s} {'read s':>8s} {'MB/s':>6s} {'CPU s':>7s} {'write s':>8s} {'MB/s':>6s} {'CPU s':>7s}")
    for m in MODES:
        d = med[m]
        print(f"{m:10s} {d['read_s']:8.3f} {mb / d['read_s']:6.0f} {d['read_cpu_s']:7.3f} "
              f"{d['write_s']:8.3f} {mb / d['write_s']:6.0f} {d['write_cpu_s']:7.3f}")
    print("direct / buffered: " + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a"
                                           for k, v in ratio.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
