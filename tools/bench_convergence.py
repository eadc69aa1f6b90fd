#!/usr/bin/env python
"""Convergence of the optimizer plugins on the same model, task, seed and forward-pass budget.

Each optimizer runs in its own child process (so its peak RSS is its own): ``--budget`` forward passes of
training (a pass is one full-model forward on one batch: MeZO 2 per step, HiZOO-L 3, LoHO/HZO with
first-order blocks 3 on the steps that train them, DiZO 2 per step plus 2 per projection iteration), with a
dev evaluation every ``--eval-every`` passes. Reported per optimizer: the curve of dev accuracy and loss
against forward passes, training wall time and training CPU time (the process's CPU seconds: with one
thread per run it measures the work, whatever else loads the machine); the final dev accuracy; the cost of a
pass; the forward passes, steps, wall and CPU seconds each needed to first reach the reference's (the first
``--opt``, MeZO by default) final dev accuracy, at the resolution of ``--eval-every``; the dev accuracy each
reached within the reference's training CPU time (the same compute); peak RSS; host→device and device→host
bytes per step (blocks uploaded and written back by the streaming runtime). A markdown table is printed;
``--json`` keeps everything, ``--png`` plots the curves (needs matplotlib) and ``--from-json`` redraws both from
earlier ``--json`` files (their results in order, the first one's reference).

``--opt first-order[:fo_optimizer=adamw,fo_lr=1e-4]`` is a plain first-order reference (every decoder block by
AdamW/SGD on one unperturbed pass per step, no perturbed passes). ``--max-cpu-seconds`` stops each run after that
much training CPU time: give it the reference's training CPU seconds for an equal-time comparison.

``--jobs N`` runs N optimizers at once (each in its own process): on a shared machine, run them all at once with
``--threads 1`` so that every run sees the same load and their wall times compare.

Tasks (built-in, :mod:`zoedge.train.demo_task`): ``demo`` (sentiment, " terrible" / " great") and ``codes``
(the same reviews under arbitrary label words " A" / " B": at chance zero-shot, the mapping must be learned); and
this tool's ``compare`` (which of two 2-digit numbers is larger, " first" / " second": arithmetic the model must
learn, at chance zero-shot). ``--eval-on test`` evaluates on a third disjoint split (``--n-test`` examples) instead
of dev, for a held-out figure after tuning on dev (tools/bench_methods.py); the curve keys stay ``dev_*``.

Examples::

    python tools/bench_convergence.py --budget 400 --eval-every 80 --png conv.png --json conv.json
    python tools/bench_convergence.py --task codes --threads 1 --jobs 3 --opt mezo \\
        --opt "loho:fo_layers=4,fo_lr=1e-3" --opt "hzo:fo_layers=4,nu=10,fo_lr=1e-3" --budget 300
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

try:
    import zoedge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoedge.train.tasks import BUILTIN_TASKS, Example, builtin_task  # noqa: E402

def compare_examples(n: int, seed: int = 0) -> list[Example]:
    """``n`` unique, label-balanced examples of "which of two distinct 2-digit numbers is larger", seeded order."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if a != b]
    if not 1 <= n <= len(pairs):
        raise SystemExit(f"compare task: n={n} must be in [1, {len(pairs)}]")
    rng = random.Random(f"zoedge-compare:{seed}")
    rng.shuffle(pairs)
    firsts = [p for p in pairs if p[0] > p[1]]
    seconds = [p for p in pairs if p[0] < p[1]]
    chosen = [(p, 0) for p in firsts[:(n + 1) // 2]] + [(p, 1) for p in seconds[:n // 2]]
    rng.shuffle(chosen)
    return [Example(f"{a} or {b}: the larger number is the", (" first", " second"), label)
            for (a, b), label in chosen]


#: tasks this tool defines besides zoedge's built-in ones
TOOL_TASKS = {"compare": compare_examples}
TASKS = BUILTIN_TASKS + tuple(TOOL_TASKS)

def _register_first_order_reference() -> None:
    """``first-order``: a plain first-order reference (one unperturbed forward and backward per step, every decoder
    block trained by the framework's first-order optimizer, no ZO part; embeddings, final norm and head frozen).

    Unlike ``loho:lr=0,fo_layers=99`` it runs no perturbed passes, so its wall and CPU time are those of plain
    AdamW/SGD fine-tuning of the blocks: the budget for an equal-time comparison. Registered by :func:`run_one`
    only (and removed again by :func:`run_here`), so importing the tool adds no plugin."""
    from zoedge.optim.api import FOSettings, Update, ZOOptimizer, layer_index, register_optimizer

    @register_optimizer("first-order")
    class FirstOrderReference(ZOOptimizer):
        """First-order reference: every decoder block trained by SGD/AdamW on one unperturbed pass per step.

        Args:
            fo_optimizer: sgd, adamw or adamw8bit.
            fo_lr: its learning rate.
        """

        passes, fo_pass, dense = 1, 0, False

        def __init__(self, *, seed: int = 0, fo_optimizer: str = "adamw", fo_lr: float = 1e-4) -> None:
            super().__init__(seed=seed, lr=0.0)
            self.fo_optimizer, self.fo_lr = fo_optimizer, fo_lr

        def fo_blocks(self, blocks):  # type: ignore[no-untyped-def]
            return [b.name for b in blocks if layer_index(b.name) is not None]

        def fo_settings(self) -> FOSettings:
            return FOSettings(self.fo_optimizer, self.fo_lr)

        def perturb(self, block, p):  # type: ignore[no-untyped-def]
            return block.tensors

        def end_step(self, losses):  # type: ignore[no-untyped-def]
            return Update({}, {})

        def apply(self, block, update):  # type: ignore[no-untyped-def]
            pass


DEFAULT_OPTS = ("mezo", "hizoo-l:alpha=1e-8", "dizo:cycle=20,iters=5", "loho:fo_layers=2,fo_lr=1e-3",
                "hzo:fo_layers=2,nu=10,fo_lr=1e-3,rank=8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None, help="HF checkpoint or prepared store (default: SmolLM2-135M-Instruct)")
    p.add_argument("--task", choices=TASKS, default="demo")
    p.add_argument("--opt", action="append", default=None, metavar="NAME[:k=v,...]",
                   help=f"optimizer and options (repeatable; default: {' '.join(DEFAULT_OPTS)}); the key peft=lora "
                        "trains LoRA adapters on the frozen base instead of the weights (finetune --peft lora)")
    p.add_argument("--lr", type=float, default=1e-5, help="ZO learning rate given to every plugin (option lr)")
    p.add_argument("--budget", type=int, default=400, help="training forward passes per optimizer")
    p.add_argument("--eval-every", type=int, default=80, help="forward passes between dev evaluations")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="also stop an optimizer after this much training wall time (0: no limit), then evaluate")
    p.add_argument("--max-cpu-seconds", type=float, default=0.0,
                   help="also stop an optimizer after this much training CPU time (0: no limit), then evaluate: "
                        "an equal-time budget that the machine's other load does not change (one thread per run)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-test", type=int, default=0, help="examples of the test split (used with --eval-on test)")
    p.add_argument("--eval-on", choices=("dev", "test"), default="dev", help="the split the curve evaluates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--jobs", type=int, default=1, help="optimizers run at once, each in its own process (0: one "
                   "after another in this process; peak RSS is then the process's, not the run's)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="FILE",
                   help="no training: the table (and --png, --json) of earlier --json files")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: run one optimizer, print JSON
    return p.parse_args(argv)


def splits(task: str, n_train: int, n_dev: int, n_test: int = 0) -> tuple[list, list, list]:
    """Disjoint train, dev and test examples of a task (the same for every optimizer and seed)."""
    n = n_train + n_dev + n_test
    ex = TOOL_TASKS[task](n, seed=0) if task in TOOL_TASKS else builtin_task(task, n, seed=0)
    return ex[:n_train], ex[n_train:n_train + n_dev], ex[n_train + n_dev:]


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
    _register_first_order_reference()
    name, options = spec_options(args.one)
    peft = options.pop("peft", "none")  # not a plugin option: LoRA adapters on the frozen base (--peft lora)
    if peft not in ("none", "lora"):
        raise SystemExit(f"{args.one}: peft={peft} (use peft=lora)")
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
    if peft == "lora":  # finetune --peft lora's defaults: rank 8, alpha 16, q_proj and v_proj
        from zoedge.runtime.lora import LoraSpec
        model.attach_lora(LoraSpec(), seed=args.seed)
    tok = AutoTokenizer.from_pretrained(store)
    train, dev, test = splits(args.task, args.n_train, args.n_dev, args.n_test)
    if args.eval_on == "test":
        if not test:
            raise SystemExit("--eval-on test needs --n-test > 0")
        dev = test
    opt = build(name, options, seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        t = Trainer(model, tok, opt, train, dev, [], TrainSettings(steps=10**9, batch_size=args.batch_size,
                                                                   seed=args.seed), Path(out), progress=False,
                    log=lambda s: None)
        curve: list[dict[str, float]] = []

        passes, steps, seconds, cpu_seconds, next_eval = 0, 0, 0.0, 0.0, args.eval_every

        def evaluate() -> None:
            up, down = moved["up"], moved["down"]
            e = t.evaluate(dev, "dev")
            moved["up"], moved["down"] = up, down  # eval traffic is not training traffic
            curve.append({"passes": passes, "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds,
                          "dev_accuracy": e.accuracy, "dev_loss": e.loss})
            print(f"[{args.one}] {passes} passes, {seconds:.0f} s ({cpu_seconds:.0f} CPU s): dev accuracy "
                  f"{e.accuracy:.3f}, loss {e.loss:.4f}", file=sys.stderr, flush=True)

        evaluate()
        moved["up"] = moved["down"] = 0
        while (passes < args.budget and not 0 < args.max_seconds <= seconds
               and not 0 < args.max_cpu_seconds <= cpu_seconds):
            t0, c0 = time.perf_counter(), time.process_time()
            m = t.train_step()
            seconds += time.perf_counter() - t0
            cpu_seconds += time.process_time() - c0
            steps += 1
            passes += len(t.last_losses) + int(m.get("projection_passes", 0))
            if passes >= next_eval or passes >= args.budget:
                evaluate()
                next_eval += args.eval_every
        if curve[-1]["passes"] != passes:  # stopped by --max-seconds / --max-cpu-seconds between evaluations
            evaluate()
        fo = t.fo.memory() if t.fo is not None else {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"optimizer": args.one, "options": options, "steps": steps, "passes": passes, "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds, "curve": curve, "peak_rss_bytes": peak,
            "up_bytes_per_step": moved["up"] / steps, "down_bytes_per_step": moved["down"] / steps,
            "fo_memory": fo, "eval_split": args.eval_on, "seed": args.seed}


def first_reach(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first evaluation point at or above ``target`` dev accuracy (None: never reached)."""
    return next((p for p in curve if p["dev_accuracy"] is not None and p["dev_accuracy"] >= target), None)


def accuracy_within(curve: list[dict[str, float]], key: str, limit: float) -> float:
    """The dev accuracy of the last evaluation done within ``limit`` of ``key`` (passes, seconds, cpu_seconds)."""
    return [p for p in curve if p[key] <= limit * (1 + 1e-9)][-1]["dev_accuracy"]


def mib(value: float | None, unit: int = 2**20, fmt: str = ".0f", suffix: str = "") -> str:
    """``value / unit`` formatted, or "—" where a record lacks it (a run rebuilt from its progress log)."""
    return "—" if value is None else f"{value / unit:{fmt}}{suffix}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: the curves' summary, then what it took each optimizer to reach the reference's accuracy."""
    ref = results[0]
    target = ref["curve"][-1]["dev_accuracy"]
    ref_cpu, ref_wall = ref["train_cpu_seconds"], ref["train_seconds"]
    lines = ["| optimizer | dev acc start -> final (loss) | passes (steps) | train s (CPU s) | s / pass (CPU) | "
             f"dev acc within {ref_cpu:.0f} CPU s / {ref_wall:.0f} s | peak RSS | MB up / down per step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["curve"]
        lines.append(f"| {r['optimizer']} | {c[0]['dev_accuracy']:.3f} -> {c[-1]['dev_accuracy']:.3f} "
                     f"({c[-1]['dev_loss']:.3f}) | {r['passes']} ({r['steps']}) | {r['train_seconds']:.0f} "
                     f"({r['train_cpu_seconds']:.0f}) | {r['train_seconds'] / r['passes']:.2f} "
                     f"({r['train_cpu_seconds'] / r['passes']:.2f}) | "
                     f"{accuracy_within(c, 'cpu_seconds', ref_cpu):.3f} / {accuracy_within(c, 'seconds', ref_wall):.3f}"
                     f" | {mib(r['peak_rss_bytes'], 2**30, '.2f', ' GiB')} | {mib(r['up_bytes_per_step'])} / "
                     f"{mib(r['down_bytes_per_step'])} |")
    lines += ["", f"steps to target: first evaluation at or above {ref['optimizer']}'s final dev accuracy {target:.3f}",
              "", "| optimizer | passes | steps | train s | CPU s | passes vs reference |", "|---|---|---|---|---|---|"]
    ref_hit = first_reach(ref["curve"], target)
    for r in results:
        p = first_reach(r["curve"], target)
        if p is None:
            lines.append(f"| {r['optimizer']} | not reached in {r['passes']} | | | | |")
        else:
            ratio = f"{p['passes'] / ref_hit['passes']:.2f}x" if ref_hit["passes"] else "—"
            lines.append(f"| {r['optimizer']} | {p['passes']} | {p['steps']} | {p['seconds']:.0f} | "
                         f"{p['cpu_seconds']:.0f} | {ratio} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str = "") -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return
    keys = (("passes", "training forward passes"), ("cpu_seconds", "training CPU time (s)"),
            ("seconds", "training wall time (s)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(15, 5.2))
    for r in results:
        c = r["curve"]
        for ax, (key, label) in zip(axes, keys):
            ax.plot([x[key] for x in c], [x["dev_accuracy"] for x in c], marker="o", label=r["optimizer"])
            ax.set_xlabel(label)
    for ax in axes:
        ax.set_ylabel("dev accuracy")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(textwrap.fill(title, 170), fontsize=9)
    fig.tight_layout(rect=(0, 0.05 + 0.025 * ((len(results) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=120)


def run_here(argv: list[str]) -> dict[str, Any]:
    """:func:`run_one` in this process, whose plugin registry is left as it was (without ``first-order``)."""
    from zoedge.optim.registry import unregister

    try:
        return run_one(parse_args(argv))
    finally:
        unregister("first-order")


def run_all(args: argparse.Namespace, specs: list[str], child: list[str]) -> list[dict[str, Any]]:
    """Each spec in its own child process, ``args.jobs`` at a time; results in spec order (``--jobs 0``: in this
    process, one after another)."""
    if args.jobs == 0:
        return [run_here([*child, "--one", spec]) for spec in specs]
    results: dict[str, dict[str, Any]] = {}
    pending = list(specs)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < max(args.jobs, 1):
            spec = pending.pop(0)
            cmd = [sys.executable, __file__, *child, "--one", spec]
            running.append((spec, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
        spec, proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{spec}: the run failed (exit {proc.returncode}); its error is above")
        results[spec] = json.loads(out.strip().splitlines()[-1])
    return [results[s] for s in specs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    if args.from_json:
        loaded = [json.loads(f.read_text()) for f in args.from_json]
        results = [r for d in loaded for r in d["results"]]
        header = loaded[0]["header"]
    else:
        specs = args.opt or list(DEFAULT_OPTS)
        if len(set(specs)) != len(specs):
            raise SystemExit(f"--opt: {specs} names an optimizer setting twice; give each once")
        child = list(argv if argv is not None else sys.argv[1:])
        load_before = os.getloadavg()[0]
        results = run_all(args, specs, child)
        limit = (f" or {args.max_seconds:.0f} s" if args.max_seconds else "") + \
            (f" or {args.max_cpu_seconds:.0f} CPU s" if args.max_cpu_seconds else "")
        header = (f"task {args.task}, budget {args.budget} forward passes{limit}, batch {args.batch_size}, "
                  f"{args.n_train} train / {args.n_dev} dev, seed {args.seed}, ZO lr {args.lr} unless given, "
                  f"{args.threads or 'default'} thread(s) x {min(args.jobs, len(specs))} run(s) at once; "
                  f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                  f"load {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(header)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))
    if args.png:
        plot(results, args.png, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
