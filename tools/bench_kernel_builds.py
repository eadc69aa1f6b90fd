"""The noise kernel as installed against the kernel compiled at first use: N(0, 1) fill time, one thread.

    nice python tools/bench_kernel_builds.py --numel 4194304 --repeat 15

Times ``zoedge_philox_fill`` (one thread) of: the library built when zoedge was installed (setup.py: portable
flags, on x86-64 the value loops compiled per ISA level and picked at load), the library philox.py compiles at
first use (``-march=native``, one copy of the loops, into a temporary cache), a portable build without the
per-ISA loops (philox.py's flags without ``-march=native``: what a plain portable build gives), and torch's ``normal_`` as the yardstick. The
libraries alternate, round after round; the minimum per library is printed in ns per value, with each
library's values checked bit-equal to the installed one's.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from zoedge.noise import philox


def _fill(path: Path):
    fn = ctypes.CDLL(str(path)).zoedge_philox_fill
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int]
    return lambda out: fn(out.data_ptr(), out.numel(), 0, 12345, philox.KINDS["normal"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, installed = philox._installed_library()
    libs = {"installed (setup.py)": installed}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ZOEDGE_CACHE"] = tmp
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler:
            libs["built at first use (-march=native)"] = philox._Kernel(installed=False)._build(compiler)
            plain = Path(tmp) / "plain.so"
            subprocess.run([compiler, *philox.FLAGS, "-fopenmp", str(philox.SOURCE), "-o", str(plain)], check=True)
            libs["portable, no per-ISA loops"] = plain
        fills = {name: _fill(path) for name, path in libs.items()}
        fills["torch normal_ (yardstick)"] = lambda out: out.normal_()
        outs = {name: torch.empty(args.numel) for name in fills}
        best = dict.fromkeys(fills, float("inf"))
        for _ in range(args.repeat):
            for name, fill in fills.items():
                t0 = time.perf_counter()
                fill(outs[name])
                best[name] = min(best[name], time.perf_counter() - t0)
    ref = outs["installed (setup.py)"].view(torch.int32)
    load = os.getloadavg()[0]
    print(f"{args.numel} N(0, 1) values, one thread, min of {args.repeat} alternating rounds (load {load:.1f}):")
    for name, t in best.items():
        same = "" if name.startswith("torch") else (", bit-equal" if torch.equal(outs[name].view(torch.int32), ref)
                                                   else ", VALUES DIFFER")
        print(f"  {name:38s} {t / args.numel * 1e9:6.2f} ns/value{same}")


if __name__ == "__main__":
    main()
