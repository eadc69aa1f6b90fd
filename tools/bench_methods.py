#!/usr/bin/env python
"""A fair comparison of the optimizers: the same tuning budget on dev, then several seeds on test.

For each task and each method, the first ``--grid K`` configurations of the method's grid (:data:`GRIDS`, around
its paper's or shipped values: the learning rate, ε and the method's own key knob; the same K for every method)
are trained on train and evaluated on dev with ``--tune-seed``; the configuration with the best final dev
accuracy (ties: the lower dev loss) is then trained with each of ``--seeds`` and evaluated on a disjoint test
split. Every run is one child of tools/bench_convergence.py (its own process, ``--threads`` torch threads,
``--jobs`` at once), with the same forward-pass budget, batch size and data.

Reported per task and method: the chosen configuration, mean ± std (over seeds) of the final test accuracy, the
steps, forward passes and training CPU seconds each seed needed to first reach MeZO's mean final test accuracy
(at the resolution of ``--eval-every``; "k/N" seeds reached it), and the per-step cost (forward passes and CPU
seconds per step). ``adamw`` is the first-order reference (tools/bench_convergence.py's ``first-order``): every
decoder block trained by AdamW on one unperturbed forward and backward per step, no ZO passes (the embeddings and
head stay frozen), so its CPU seconds are plain AdamW fine-tuning's.

``mezo-lora`` is MeZO on LoRA adapters (``finetune --peft lora``: rank 8, alpha 16 on q_proj / v_proj, the base
frozen; its grid starts at the lr 5e-3, ε 1e-2 tuned on the demo task, docs/lora.md).

``--json`` keeps every run (tuning and test), ``--png`` draws test accuracy against forward passes and against
CPU seconds, mean over seeds with a ±std band, one row of plots per task; ``--from-json`` redraws both.

Example (small scale; docs/methods.md "Tuned benchmark" has the commands of the measured runs)::

    nice -n 19 python tools/bench_methods.py --task codes --task demo --grid 2 --seeds 0 1 2 --budget 60 \\
        --eval-every 20 --n-train 400 --n-dev 64 --n-test 128 --threads 1 --jobs 2 --json m.json --png m.png
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

_BC_PATH = Path(__file__).resolve().with_name("bench_convergence.py")
_spec = importlib.util.spec_from_file_location("bench_convergence", _BC_PATH)
bc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bc)

#: per method, configurations in the order they are tried: the paper's / shipped values first, then neighbours
#: (lr ×4 or ÷4, ε ×10, the key knob). ``--grid K`` takes the first K of each, so every method gets K runs.
GRIDS: dict[str, tuple[str, ...]] = {
    "mezo": ("mezo:lr=1e-5,eps=1e-3", "mezo:lr=4e-5,eps=1e-3", "mezo:lr=1e-5,eps=1e-2", "mezo:lr=2.5e-6,eps=1e-3"),
    "hizoo-l": ("hizoo-l:lr=4e-5,eps=1e-3,alpha=1e-8", "hizoo-l:lr=1e-5,eps=1e-3,alpha=1e-8",
                "hizoo-l:lr=4e-5,eps=1e-3,alpha=1e-6", "hizoo-l:lr=4e-5,eps=1e-2,alpha=1e-8"),
    "dizo": ("dizo:lr=1e-5,eps=1e-3,cycle=10,iters=2,gamma_lr=10", "dizo:lr=4e-5,eps=1e-3,cycle=10,iters=2,gamma_lr=1",
             "dizo:lr=1e-5,eps=1e-3,cycle=10,iters=2,gamma_lr=1", "dizo:lr=4e-5,eps=1e-3,cycle=10,iters=2,tau=0.5"),
    "loho": ("loho:lr=1e-5,eps=1e-3,fo_layers=2,fo_lr=1e-3", "loho:lr=1e-5,eps=1e-3,fo_layers=4,fo_lr=1e-2",
             "loho:lr=4e-5,eps=1e-3,fo_layers=2,fo_lr=1e-2", "loho:lr=1e-5,eps=1e-3,fo_layers=4,fo_lr=1e-3"),
    "hzo": ("hzo:lr=1e-5,eps=1e-3,rank=8,nu=10,fo_layers=2,fo_lr=1e-3",
            "hzo:lr=1e-5,eps=1e-3,rank=8,nu=5,fo_layers=4,fo_lr=1e-2",
            "hzo:lr=4e-5,eps=1e-3,rank=8,nu=5,fo_layers=2,fo_lr=1e-2",
            "hzo:lr=1e-5,eps=1e-3,rank=4,nu=10,fo_layers=4,fo_lr=1e-3"),
    "mezo-lora": ("mezo:lr=5e-3,eps=1e-2,peft=lora", "mezo:lr=2e-3,eps=1e-2,peft=lora",
                  "mezo:lr=1e-2,eps=1e-2,peft=lora", "mezo:lr=5e-3,eps=1e-3,peft=lora"),
    "adamw": ("first-order:fo_optimizer=adamw,fo_lr=1e-4", "first-order:fo_optimizer=adamw,fo_lr=1e-5",
              "first-order:fo_optimizer=adamw,fo_lr=3e-4", "first-order:fo_optimizer=adamw,fo_lr=3e-5"),
}
REFERENCE = "mezo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None, help="HF checkpoint or prepared store (default: SmolLM2-135M-Instruct)")
    p.add_argument("--task", action="append", choices=bc.TASKS, default=None, help="repeatable (default: codes)")
    p.add_argument("--method", action="append", choices=tuple(GRIDS), default=None,
                   help=f"repeatable (default: all; {REFERENCE} is always run, as the target)")
    p.add_argument("--grid", type=int, default=2, help="configurations tuned per method (the first K of its grid)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="test seeds of the chosen setting")
    p.add_argument("--tune-seed", type=int, default=100)
    p.add_argument("--budget", type=int, default=120, help="training forward passes per run")
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-dev", type=int, default=100)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each in its own process (0: in this one)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="keep each finished run's result here and reuse it when the same run is asked again "
                        "(an interrupted benchmark resumes where it stopped)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="FILE",
                   help="no training: redraw --json files (their tasks together; --json writes the merged report)")
    args = p.parse_args(argv)
    if not 1 <= args.grid <= min(len(g) for g in GRIDS.values()):
        p.error(f"--grid {args.grid}: give 1..{min(len(g) for g in GRIDS.values())}")
    return args


def child_argv(args: argparse.Namespace, task: str, seed: int, split: str) -> list[str]:
    """bench_convergence.py's options for one run (its ``--one SPEC`` is added by :func:`run_many`)."""
    out = ["--task", task, "--seed", str(seed), "--eval-on", split, "--budget", str(args.budget),
           "--eval-every", str(args.eval_every), "--batch-size", str(args.batch_size), "--n-train", str(args.n_train),
           "--n-dev", str(args.n_dev), "--n-test", str(args.n_test), "--threads", str(args.threads)]
    return out + (["--model", str(args.model)] if args.model else [])


def code_identity() -> str:
    """A hash of the code a run executes: every ``.py`` file of zoedge and its plugins, and bench_convergence.py.
    Part of each run's key, so that ``--runs-dir`` never hands back a result of other code."""
    h = hashlib.sha256()
    roots = [Path(loc) for name in ("zoedge", "zoedge_plugins")
             for loc in (importlib.util.find_spec(name).submodule_search_locations or [])]
    files = [(f"{root.name}/{f.relative_to(root)}", f) for root in roots for f in root.rglob("*.py")]
    for name, path in sorted(files) + [("tools/bench_convergence.py", _BC_PATH)]:
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def run_key(opts: list[str], spec: str, code: str) -> str:
    """A finished run's file name in ``--runs-dir``: the hash of everything that defines the run (its options
    and the code, :func:`code_identity`)."""
    return hashlib.sha256(json.dumps([*opts, "--one", spec, code]).encode()).hexdigest()[:24] + ".json"


def run_many(runs: list[tuple[list[str], str]], jobs: int, runs_dir: Path | None = None) -> list[dict[str, Any]]:
    """Each (child options, spec) in its own bench_convergence child, ``jobs`` at a time; results in order.
    ``jobs`` 0: one after another in this process (no per-run peak RSS; for tests). With ``runs_dir``, a run
    whose result is already there is not run again, and each finished run's result is written there at once
    (atomically: a cut-off benchmark leaves whole results or none). A result is reused only for the same options
    and the same code (:func:`run_key`)."""
    results: list[dict[str, Any] | None] = [None] * len(runs)
    code = code_identity() if runs_dir is not None else ""
    keys = [run_key(opts, spec, code) for opts, spec in runs]
    if runs_dir is not None:
        runs_dir.mkdir(parents=True, exist_ok=True)
        for i, key in enumerate(keys):
            try:
                results[i] = json.loads((runs_dir / key).read_text())
            except FileNotFoundError:
                pass
            except ValueError:  # torn by a power cut (the result is not fsynced): run it again
                print(f"{runs_dir / key}: not a whole result; running that run again", file=sys.stderr)

    def keep(i: int, result: dict[str, Any]) -> None:
        results[i] = result
        if runs_dir is not None:
            tmp = runs_dir / (keys[i] + ".tmp")
            tmp.write_text(json.dumps(result))
            os.replace(tmp, runs_dir / keys[i])

    pending = [(i, run) for i, run in enumerate(runs) if results[i] is None]
    if jobs == 0:
        for i, (opts, spec) in pending:
            keep(i, bc.run_here([*opts, "--one", spec]))
        return results  # type: ignore[return-value]
    running: list[tuple[int, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < max(jobs, 1):
            i, (opts, spec) = pending.pop(0)
            cmd = [sys.executable, str(_BC_PATH), *opts, "--one", spec]
            running.append((i, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
        i, proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{runs[i][1]} ({' '.join(runs[i][0])}): the run failed (exit {proc.returncode})")
        keep(i, json.loads(out.strip().splitlines()[-1]))
    return results  # type: ignore[return-value]


def choose(tuning: list[dict[str, Any]]) -> dict[str, Any]:
    """The tuning run with the best final dev accuracy; ties go to the lower final dev loss, then grid order."""
    return max(tuning, key=lambda r: (r["curve"][-1]["dev_accuracy"], -r["curve"][-1]["dev_loss"]))


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(tests: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Mean ± std of the final accuracy over seeds; per seed, what it took to first reach ``target``."""
    finals = [r["curve"][-1]["dev_accuracy"] for r in tests]
    hits = [bc.first_reach(r["curve"], target) for r in tests]
    reached = [h for h in hits if h is not None]
    steps = sum(r["steps"] for r in tests)
    out = {"accuracy": mean_std(finals), "reached": len(reached), "seeds": len(tests),
           "passes_per_step": sum(r["passes"] for r in tests) / steps,
           "cpu_per_step": sum(r["train_cpu_seconds"] for r in tests) / steps}
    for key in ("steps", "passes", "cpu_seconds"):
        out[f"{key}_to_target"] = mean_std([h[key] for h in reached]) if reached else None
    return out


def table(report: dict[str, Any]) -> str:
    lines = []
    for task, per in report["tasks"].items():
        target = per[REFERENCE]["summary"]["target"]
        start = per[REFERENCE]["tests"][0]["curve"][0]["dev_accuracy"]
        note = (f" (not above the untrained model's {start:.3f}: every method reaches it at step 0, the "
                "to-target columns say nothing)" if target <= start else "")
        lines += [f"task {task}: test accuracy over seeds; target = {REFERENCE}'s mean final test accuracy "
                  f"{target:.3f}{note}", "",
                  "| method | chosen (dev acc) | test acc mean ± std | reached target | steps to target | "
                  "passes to target | CPU s to target | passes / step | CPU s / step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, m in per.items():
            s = m["summary"]

            def ms(key: str, fmt: str = ".0f") -> str:
                v = s[f"{key}_to_target"]
                return "—" if v is None else f"{v[0]:{fmt}} ± {v[1]:{fmt}}"

            lines.append(f"| {method} | `{m['chosen']}` ({m['chosen_dev']:.3f}) | {s['accuracy'][0]:.3f} ± "
                         f"{s['accuracy'][1]:.3f} | {s['reached']}/{s['seeds']} | {ms('steps')} | {ms('passes')} | "
                         f"{ms('cpu_seconds')} | {s['passes_per_step']:.2f} | {s['cpu_per_step']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return
    tasks = list(report["tasks"])
    keys = (("passes", "training forward passes"), ("cpu_seconds", "training CPU seconds"))
    fig, axes = plt.subplots(len(tasks), len(keys), figsize=(13, 4.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for method, m in report["tasks"][task].items():
            curves = [r["curve"] for r in m["tests"]]
            n = min(len(c) for c in curves)
            acc = [[c[i]["dev_accuracy"] for c in curves] for i in range(n)]
            mean = [statistics.fmean(a) for a in acc]
            std = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in acc]
            for ax, (key, label) in zip(row, keys):
                x = [statistics.fmean(c[i][key] for c in curves) for i in range(n)]
                color = f"C{list(GRIDS).index(method) % 10}"  # one colour per method on every row
                ax.plot(x, mean, marker="o", ms=3, label=method, color=color)
                ax.fill_between(x, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                                color=color, alpha=0.15)
                ax.set_xlabel(label)
        for ax in row:
            ax.set_ylabel(f"{task}: test accuracy")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(report["header"], 150), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        loaded = [json.loads(f.read_text()) for f in args.from_json]
        report = {"tasks": {t: per for r in loaded for t, per in r["tasks"].items()},
                  "header": " | ".join(dict.fromkeys(r["header"] for r in loaded)), "args": loaded[0]["args"]}
    else:
        tasks = args.task or ["codes"]
        methods = [REFERENCE] + [m for m in (args.method or GRIDS) if m != REFERENCE]
        load_before = os.getloadavg()
        tuning_runs = [(child_argv(args, t, args.tune_seed, "dev"), spec)
                       for t in tasks for m in methods for spec in GRIDS[m][:args.grid]]
        tuned = iter(run_many(tuning_runs, args.jobs, args.runs_dir))
        tuning = {(t, m): [next(tuned) for _ in range(args.grid)] for t in tasks for m in methods}
        chosen = {key: choose(runs) for key, runs in tuning.items()}
        test_runs = [(child_argv(args, t, s, "test"), chosen[t, m]["optimizer"])
                     for t in tasks for m in methods for s in args.seeds]
        tested = iter(run_many(test_runs, args.jobs, args.runs_dir))
        report = {"tasks": {}, "args": {k: str(v) for k, v in vars(args).items()}}
        for t in tasks:
            per = report["tasks"][t] = {}
            for m in methods:
                per[m] = {"chosen": chosen[t, m]["optimizer"], "chosen_dev": chosen[t, m]["curve"][-1]["dev_accuracy"],
                          "tuning": tuning[t, m], "tests": [next(tested) for _ in args.seeds]}
            target = statistics.fmean(r["curve"][-1]["dev_accuracy"] for r in per[REFERENCE]["tests"])
            for m in methods:
                per[m]["summary"] = {**summarize(per[m]["tests"], target), "target": target}
        report["header"] = (f"tasks {', '.join(tasks)}; grid {args.grid} configs per method on dev (seed "
                            f"{args.tune_seed}), seeds {' '.join(map(str, args.seeds))} on test; budget {args.budget} "
                            f"forward passes, eval every {args.eval_every}, batch {args.batch_size}, "
                            f"{args.n_train}/{args.n_dev}/{args.n_test} train/dev/test; {args.threads} thread(s) x "
                            f"{args.jobs} runs at once; {platform.machine()}, {os.cpu_count()} CPUs, load average "
                            f"{load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(report["header"])
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.png:
        plot(report, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
