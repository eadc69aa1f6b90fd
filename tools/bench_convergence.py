#!/usr/bin/env python
"""Convergence of the optimizer plugins on the same model, task, seed and forward-pass budget.

Each optimizer runs in its own child process (so its peak RSS is its own): ``--budget`` forward passes of
training (a pass is one full-model forward on one batch: MeZO 2 per step, HiZOO-L 3, LoHO/HZO with
first-order blocks 3 on the steps that train them, DiZO 2 per step plus 2 per projection iteration), with a
dev evaluation every ``--eval-every`` passes. Reported per optimizer: the curve of dev accuracy and loss
against forward passes and training wall time; the final dev accuracy; the passes and seconds each needed to
first reach MeZO's final dev accuracy; peak RSS; host→device and device→host bytes per step (blocks uploaded
and written back by the streaming runtime). A markdown table is printed; ``--json`` keeps everything and
``--png`` plots the curves (needs matplotlib).

Tasks: ``demo`` (the built-in task) and ``hard`` (its negated and contrast sentences only, where small models
mostly fail zero-shot).

Examples::

    python tools/bench_convergence.py --budget 400 --eval-every 80 --png conv.png --json conv.json
    python tools/bench_convergence.py --task hard --opt mezo --opt "loho:fo_layers=4,fo_lr=1e-3" \\
        --opt "hzo:fo_layers=4,nu=10,fo_lr=1e-3" --budget 300
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import zoedge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_OPTS = ("mezo", "hizoo-l:alpha=1e-8", "dizo:cycle=20,iters=5", "loho:fo_layers=2,fo_lr=1e-3",
                "hzo:fo_layers=2,nu=10,fo_lr=1e-3,rank=8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None, help="HF checkpoint or prepared store (default: SmolLM2-135M-Instruct)")
    p.add_argument("--task", choices=("demo", "hard"), default="demo")
    p.add_argument("--opt", action="append", default=None, metavar="NAME[:k=v,...]",
                   help=f"optimizer and options (repeatable; default: {' '.join(DEFAULT_OPTS)})")
    p.add_argument("--lr", type=float, default=1e-5, help="ZO learning rate given to every plugin (option lr)")
    p.add_argument("--budget", type=int, default=400, help="training forward passes per optimizer")
    p.add_argument("--eval-every", type=int, default=80, help="forward passes between dev evaluations")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: run one optimizer, print JSON
    return p.parse_args(argv)


def splits(task: str, n_train: int, n_dev: int, seed: int) -> tuple[list, list]:
    from zoedge.train.demo_task import demo_examples
    weights = (0.3, 0.3, 0.2, 0.2) if task == "demo" else (0.0, 0.0, 0.5, 0.5)
    ex = demo_examples(n_train + n_dev, seed=0, weights=weights)
    return ex[:n_train], ex[n_train:]


def spec_options(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Child: train one optimizer to the pass budget; its curve, bytes and peak RSS."""
    import torch
    from transformers import AutoTokenizer

    from zoedge.optim.registry import build, options_of, load
    from zoedge.runtime.engines import SyncEngine
    from zoedge.runtime.streamed import StreamedModel
    from zoedge.train.job import resolve_store
    from zoedge.train.trainer import TrainSettings, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    name, options = spec_options(args.one)
    if "lr" in options_of(load(name)) and "lr" not in options:
        options["lr"] = str(args.lr)
    store = resolve_store(args.model, progress=False)
    model = StreamedModel(store, in_place=False)  # stream through slots: count what an accelerator would move
    moved = {"up": 0, "down": 0}

    class Counting(SyncEngine):  # the CPU engine, adding up the bytes of uploads and of real write-backs
        def issue(self, op: Any) -> None:
            super().issue(op)
            if op.kind == "upload":
                moved["up"] += op.nbytes
            elif op.kind == "offload" and not op.skipped:
                moved["down"] += op.nbytes

    model.use_engine(Counting())
    tok = AutoTokenizer.from_pretrained(store)
    train, dev = splits(args.task, args.n_train, args.n_dev, args.seed)
    opt = build(name, options, seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        t = Trainer(model, tok, opt, train, dev, [], TrainSettings(steps=10**9, batch_size=args.batch_size,
                                                                   seed=args.seed), Path(out), progress=False,
                    log=lambda s: None)
        curve: list[dict[str, float]] = []

        def evaluate(passes: int, seconds: float) -> None:
            e = t.evaluate(dev, "dev")
            curve.append({"passes": passes, "seconds": seconds, "dev_accuracy": e.accuracy, "dev_loss": e.loss})
            print(f"[{args.one}] {passes} passes, {seconds:.0f} s: dev accuracy {e.accuracy:.3f}", file=sys.stderr)

        evaluate(0, 0.0)
        passes, seconds, steps, next_eval = 0, 0.0, 0, args.eval_every
        moved["up"] = moved["down"] = 0
        while passes < args.budget:
            t0 = time.perf_counter()
            m = t.train_step()
            seconds += time.perf_counter() - t0
            steps += 1
            passes += len(t.last_losses) + int(m.get("projection_passes", 0))
            if passes >= next_eval or passes >= args.budget:
                up, down = moved["up"], moved["down"]
                evaluate(passes, seconds)
                moved["up"], moved["down"] = up, down  # eval traffic is not training traffic
                next_eval += args.eval_every
        fo = t.fo.memory() if t.fo is not None else {}
    return {"optimizer": args.one, "options": options, "steps": steps, "passes": passes, "train_seconds": seconds,
            "curve": curve, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "up_bytes_per_step": moved["up"] / steps, "down_bytes_per_step": moved["down"] / steps,
            "fo_memory": fo}


def first_reach(curve: list[dict[str, float]], target: float) -> tuple[float | None, float | None]:
    for point in curve:
        if point["dev_accuracy"] is not None and point["dev_accuracy"] >= target:
            return point["passes"], point["seconds"]
    return None, None


def table(results: list[dict[str, Any]]) -> str:
    target = results[0]["curve"][-1]["dev_accuracy"]
    lines = [f"reference: {results[0]['optimizer']} final dev accuracy {target:.3f}", "",
             "| optimizer | dev acc start -> final | passes (steps) | train s | passes / s to reach reference | "
             "peak RSS | MB up / down per step |", "|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["curve"]
        p, s = first_reach(c, target)
        reach = "not reached" if p is None else f"{p:.0f} / {s:.0f}"
        lines.append(f"| {r['optimizer']} | {c[0]['dev_accuracy']:.3f} -> {c[-1]['dev_accuracy']:.3f} | "
                     f"{r['passes']} ({r['steps']}) | {r['train_seconds']:.0f} | {reach} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['up_bytes_per_step'] / 2**20:.0f} / "
                     f"{r['down_bytes_per_step'] / 2**20:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        c = r["curve"]
        axes[0].plot([x["passes"] for x in c], [x["dev_accuracy"] for x in c], marker="o", label=r["optimizer"])
        axes[1].plot([x["seconds"] for x in c], [x["dev_accuracy"] for x in c], marker="o", label=r["optimizer"])
    axes[0].set_xlabel("training forward passes")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel("dev accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    specs = args.opt or list(DEFAULT_OPTS)
    child = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for spec in specs:
        cmd = [sys.executable, __file__, *child, "--one", spec]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"task {args.task}, budget {args.budget} forward passes, batch {args.batch_size}, seed {args.seed}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))
    if args.png:
        plot(results, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
