#!/usr/bin/env python
"""The out-of-the-box demo's step time on a quiet box vs with another process keeping one core busy.

Each round runs ``zoedge finetune`` with the demo's defaults (default model, demo task, MeZO, batch 16) for
``--steps`` steps in a fresh process, without evaluation, twice: once as the box is, once while a busy-loop
process pinned to one core (``--core``, default the last core this process may use) spins. The step time of
a run is the median of its steps' ``seconds`` in ``metrics.jsonl`` (the first step is left out: it allocates
workspaces). Quiet and loaded runs alternate (``--rounds``), so a drift in the box's background load affects
both alike. Prints the medians, the ratio loaded / quiet (issue 11's target: at most 1.5), the thread count each
run chose and changed to (from its ``summary.json``), and the 1-minute load average before and after, and writes
the same as JSON with ``--json``.

The "quiet" figure is only as quiet as the box: on a machine shared with other jobs, state their load.

Examples::

    python tools/bench_under_load.py                       # 1 round, 6 steps each
    python tools/bench_under_load.py --rounds 2 --json under_load.json
    python tools/bench_under_load.py --threads 2           # a fixed thread count instead of the policy
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUSY_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def demo_run(out: Path, steps: int, threads: int | None, extra: list[str]) -> dict[str, Any]:
    """One fresh ``zoedge finetune`` process; its per-step seconds and thread record."""
    cmd = [sys.executable, "-m", "zoedge.cli", "finetune", "--output", str(out), "--steps", str(steps),
           "--n-dev", "0", "--n-test", "0", "--eval-every", "0", "--no-plot", "--no-progress", *extra]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"zoedge finetune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    seconds = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    timed = seconds[1:] if len(seconds) > 1 else seconds
    return {"step_s": seconds, "median_step_s": statistics.median(timed), "wall_s": wall,
            "threads": summary["threads"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="steps per run (default 6; the first is not timed)")
    ap.add_argument("--rounds", type=int, default=1, help="quiet/loaded pairs, alternating (default 1)")
    ap.add_argument("--core", type=int, default=None, help="the core the busy loop is pinned to")
    ap.add_argument("--threads", type=int, default=None, help="pass --threads N to finetune (default: its policy)")
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("extra", nargs="*", help="further finetune options (after --)")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    core = cores[-1] if args.core is None else args.core
    result: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {len(cores)} usable cores",
                              "busy_core": core, "steps": args.steps, "threads_option": args.threads,
                              "load_before": load1(), "quiet": [], "loaded": []}
    with tempfile.TemporaryDirectory(prefix="zoedge-under-load-") as tmp:
        for r in range(args.rounds):
            for phase in (("quiet", "loaded") if r % 2 == 0 else ("loaded", "quiet")):
                busy = None
                if phase == "loaded":
                    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(core)])
                    time.sleep(1.0)  # let it take its core before the run samples the idle cores
                try:
                    run = demo_run(Path(tmp) / f"{phase}-{r}", args.steps, args.threads, args.extra)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                run["load_at_end"] = load1()
                result[phase].append(run)
                th = run["threads"]
                print(f"round {r} {phase:6s}: median step {run['median_step_s']:.3f} s, threads {th['threads']} "
                      f"({th['source']}) -> {th.get('final_threads', th['threads'])}, changes {th.get('changes', [])}, "
                      f"load {run['load_at_end']}", flush=True)
    quiet = statistics.median(x["median_step_s"] for x in result["quiet"])
    loaded = statistics.median(x["median_step_s"] for x in result["loaded"])
    result.update(quiet_step_s=quiet, loaded_step_s=loaded, ratio=loaded / quiet, load_after=load1())
    print(f"{result['machine']}; busy loop on core {core}; load average {result['load_before']} before, "
          f"{result['load_after']} after")
    print(f"quiet step {quiet:.3f} s, one core busy {loaded:.3f} s: ratio {loaded / quiet:.2f} (target <= 1.5)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
