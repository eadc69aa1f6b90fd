#!/usr/bin/env python
"""Plan against measurement at real widths: synthetic OPT-175B-width (2 layers) and OPT-13B-width (4 layers)
checkpoints, one MeZO training step each, counted peak device bytes vs ``zoedge plan``'s prediction.

For each case: ``zoedge synth`` (fp16, random weights) → ``zoedge prepare`` (fp16) → two training steps under the
device-memory tracker (:func:`zoedge.plan.measure.measure_step`) → the plan for the same store and step. The
OPT-13B-width step runs for real on the CPU (the device is host memory: about 1.3 GB of slots in lean mode,
4.3 GB with workspaces); the OPT-175B-width step needs 9.2 GB of device buffers in lean mode and 18.9 GB with
workspaces, beside the 8.5 GB host tier on this shared 24 GB machine, so it runs with the device on ``meta`` (the
host tier reads the store's real bytes; device buffers and activations are counted, not allocated). Each case is
measured in each runtime mode: ``lean`` (the default on an accelerator: perturbations formed just in time, whole
layers), ``half`` (lean, attention / MLP halves as units) and ``workspaces`` (``lean=False``). Short sequences keep the CPU step short;
the activations scale with them, the slots and workspaces (most of the peak) do not.

Example::

    nice python tools/bench_plan_vs_measured.py --workdir /tmp/zoedge-planbench --json plan_vs_measured.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

try:
    import zoedge  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import zoedge
from zoedge.plan.accounting import Workload, make_plan, method, model_spec
from zoedge.hardware import hardware
from zoedge.plan.measure import measure_step
from zoedge.plan.shapes import write_checkpoint

CASES = {"opt-13b": dict(layers=4, device="cpu"), "opt-175b": dict(layers=2, device="meta")}
#: runtime modes: (lean, unit)
MODES = {"lean": (True, "layer"), "half": (True, "half"), "workspaces": (False, "layer")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/zoedge-planbench"),
                   help="where checkpoints and stores go (stores are kept and reused; checkpoints deleted)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="which widths to run")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64: short, see above)")
    p.add_argument("--device", default=None, help="override the device of every case (cpu or meta)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="runtime modes to measure: lean (whole layers), half (lean, attention / MLP halves), "
                   "workspaces (lean=False) (default all)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.cases:
        case = CASES[name]
        device = args.device or case["device"]
        store = args.workdir / f"{name}-{case['layers']}l-fp16-store"
        if not (store / "manifest.json").is_file():
            ckpt = args.workdir / f"{name}-{case['layers']}l"
            if ckpt.exists():
                shutil.rmtree(ckpt)
            write_checkpoint(name, ckpt, case["layers"], "fp16")
            zoedge.prepare(ckpt, store, dtype="fp16", progress=True, log=print)
            shutil.rmtree(ckpt)
        for mode in args.modes:
            lean, unit = MODES[mode]
            t0 = time.perf_counter()
            m = measure_step(store, device, batch=args.batch, seq=args.seq, steps=2, progress=True, lean=lean,
                             unit=unit)
            wall = time.perf_counter() - t0
            work = Workload(args.batch, args.seq, unit=unit)
            plan = make_plan(model_spec(str(store)), method("mezo"), work, hardware("rtx4090"))
            full = make_plan(model_spec(name), method("mezo"), work, hardware("rtx4090"))
            peak = plan.device_peak if lean else plan.workspace_device_peak
            live = plan.device_long_lived if lean else plan.workspace_long_lived
            full_peak = full.device_peak if lean else full.workspace_device_peak
            r = {"case": name, "mode": mode, "layers": case["layers"], "device": device, "batch": args.batch,
                 "seq": args.seq, "measured_peak": m.tracked_peak, "predicted_peak": peak,
                 "ratio": m.tracked_peak / peak, "measured_long_lived": m.tracked_long_lived,
                 "predicted_long_lived": sum(live.values()), "full_depth_predicted_peak": full_peak,
                 "step_seconds": m.step_seconds, "wall_s": wall, "max_host_rss": m.max_host_rss,
                 "host_tier_bytes": m.host_tier_bytes, "load_avg": os.getloadavg(), "threads": torch.get_num_threads()}
            results.append(r)
            print(f"{name} ({case['layers']} layers, fp16, MeZO, {mode}, batch {args.batch} x seq {args.seq}, device "
                  f"{device}): measured peak {m.tracked_peak / 1e9:.3f} GB, plan {peak / 1e9:.3f} GB, ratio "
                  f"{r['ratio']:.4f}; full depth (plan, depth-independent) {full_peak / 1e9:.3f} GB; steps "
                  f"{', '.join(f'{s:.1f}' for s in m.step_seconds)} s; max RSS {m.max_host_rss / 1e9:.1f} GB; "
                  f"load {r['load_avg'][0]:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
