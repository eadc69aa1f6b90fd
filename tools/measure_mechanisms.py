#!/usr/bin/env python
"""What HiZOO-L's Hessian estimate and DiZO's projection actually do on a real model, measured in a short run.

``hizoo``: trains HiZOO-L (``--opt`` options over its defaults) for ``--steps`` steps and records, per step, the
curvature scalar c = (L₊ + L₋ − 2L₀)/(2ε²) (every tensor's instantaneous Hessian estimate is c·H⊙(z² − 1), so its
relative noise is √2·|c| per entry), the relative change of the factored state (‖ΔR‖/‖R‖ and ‖ΔC‖/‖C‖ over all
2-D weights, and ‖ΔH‖/‖H‖ of the 1-D ones) and how far the reconstructed Hessian Ĥ is from 1 (mean and max
|Ĥ − 1| over every entry of every tensor). A step's Hessian update is applied lazily at the next step's
residency: the figures after step k include the updates of steps 0..k−1 (a final flush adds the last one).

``dizo``: trains DiZO until its first projection phase has run (``cycle`` + 1 steps) and records the drift norms
t = ‖θ − θ₀‖ of every projected tensor at that phase, and γ/t after each of the phase's iterations.

Examples (SmolLM2-135M-Instruct, the demo task; docs/methods.md)::

    nice -n 19 python tools/measure_mechanisms.py hizoo --steps 20 --threads 1 --json hizoo.json
    nice -n 19 python tools/measure_mechanisms.py dizo --opt lr=4e-5 --threads 1 --json dizo.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_BC_PATH = Path(__file__).resolve().with_name("bench_convergence.py")
_spec = importlib.util.spec_from_file_location("bench_convergence", _BC_PATH)
bc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bc)

PLUGINS = {"hizoo": "hizoo-l", "dizo": "dizo"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("what", choices=tuple(PLUGINS))
    p.add_argument("--opt", default="", metavar="k=v,...", help="plugin options over its defaults")
    p.add_argument("--steps", type=int, default=20, help="hizoo: training steps (dizo: cycle + 1, from its options)")
    p.add_argument("--model", default=None, help="HF checkpoint or prepared store (default: SmolLM2-135M-Instruct)")
    p.add_argument("--task", choices=bc.TASKS, default="demo")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def hessian_stats(opt: Any) -> dict[str, Any]:
    """Ĥ's distance from 1 over every entry (reconstructed and clamped as the plugin uses it) and the raw state."""
    import torch
    total, count, worst, lo, hi = 0.0, 0, 0.0, float("inf"), 0.0
    for st in opt.h.values():
        if "h" in st:
            h = st["h"]
        else:
            r, c = st["r"], st["c"]
            h = torch.outer(r, c).div_(r.sum()).clamp_(opt.h_min, opt.h_max)
        d = (h - 1).abs()
        total, count, worst = total + float(d.sum()), count + d.numel(), max(worst, float(d.max()))
        lo, hi = min(lo, float(h.min())), max(hi, float(h.max()))
    return {"mean_abs_h_minus_1": total / max(count, 1), "max_abs_h_minus_1": worst, "h_min": lo, "h_max": hi}


def snapshot(opt: Any) -> dict[str, dict[str, Any]]:
    return {n: {k: v.clone() for k, v in st.items()} for n, st in opt.h.items()}


def rel_change(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], key: str) -> float | None:
    """‖after − before‖ / ‖before‖ over every tensor's ``key`` state (r, c or h)."""
    num = den = 0.0
    for n, st in after.items():
        if key in st and n in before:
            num += float((st[key] - before[n][key]).square().sum())
            den += float(before[n][key].square().sum())
    return (num / den) ** 0.5 if den else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from zoedge.optim.registry import build
    from zoedge.runtime.streamed import StreamedModel
    from zoedge.train.job import resolve_store
    from zoedge.train.trainer import TrainSettings, Trainer

    torch.set_num_threads(args.threads)
    options = dict(kv.split("=", 1) for kv in args.opt.split(",") if kv)
    name = PLUGINS[args.what]
    opt = build(name, options, seed=args.seed)
    store = resolve_store(args.model, progress=False)
    model = StreamedModel(store, in_place=False)
    tok = AutoTokenizer.from_pretrained(store)
    train, _, _ = bc.splits(args.task, args.n_train, 0)
    load_before, c0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as out:
        t = Trainer(model, tok, opt, train, [], [], TrainSettings(steps=10**9, batch_size=args.batch_size,
                                                                 seed=args.seed), Path(out), progress=False,
                    log=lambda s: None)
        steps = args.steps if args.what == "hizoo" else opt.cycle + 1
        for step in range(steps):
            before = snapshot(opt) if args.what == "hizoo" else {}
            m = t.train_step()
            row = {"step": step, "loss": float(m.get("loss", float("nan")))}
            if args.what == "hizoo":
                row.update(curvature=m["curvature"], projected_grad=m["projected_grad"],
                           rel_change_r=rel_change(before, opt.h, "r"), rel_change_c=rel_change(before, opt.h, "c"),
                           rel_change_h1d=rel_change(before, opt.h, "h"), **hessian_stats(opt))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        if args.what == "hizoo":
            before = snapshot(opt)
            t.flush()
            final = {"after_flush": hessian_stats(opt), "rel_change_r": rel_change(before, opt.h, "r"),
                     "rel_change_c": rel_change(before, opt.h, "c")}
            curv = [abs(r["curvature"]) for r in rows]
            summary = {"median_abs_curvature": statistics.median(curv), "max_abs_curvature": max(curv),
                       "alpha": opt.alpha, "eps": opt.eps, "final": final}
        else:
            norms = {n: v for n, v in opt.norm.items()}
            ratios = opt.history
            spread = [{"min": min(r.values()), "median": statistics.median(r.values()), "max": max(r.values()),
                       "at_clip": sum(abs(abs(v - 1) - opt.tau) < 1e-9 for v in r.values()), "of": len(r)}
                      for r in ratios]
            summary = {"drift_norms": norms, "median_drift_norm": statistics.median(norms.values()),
                       "min_drift_norm": min(norms.values()), "max_drift_norm": max(norms.values()),
                       "gamma_over_t_spread_per_iteration": spread, "gamma_over_t_per_iteration": ratios,
                       "final_gamma_over_t": ratios[-1] if ratios else {},
                       "gamma_lr": opt.gamma_lr, "mu": opt.mu, "tau": opt.tau, "cycle": opt.cycle,
                       "iters": opt.iters, "lr": opt.lr}
    header = (f"{name} {options or 'defaults'}, task {args.task}, batch {args.batch_size}, seed {args.seed}, "
              f"{args.threads} thread(s); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
              f"{time.process_time() - c0:.0f} CPU s, {time.perf_counter() - t0:.0f} s")
    print(header)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("drift_norms", "gamma_over_t_per_iteration",
                                                                   "final_gamma_over_t")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "options": options, "summary": summary, "steps": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
