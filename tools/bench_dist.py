#!/usr/bin/env python
"""Data-parallel ZO step time and bytes communicated per step, 1 rank against N ranks, launched by torchrun.

Builds a random Llama-shaped model (``--hidden``, ``--layers``; fp32 store in a temporary directory), then for
each configuration runs ``torchrun --nproc-per-node N`` on this script's worker: MeZO with ``--q`` directions on
a small classification task with global batch ``--batch``, ``--warmup`` untimed steps, then ``--steps`` timed
ones. ``--configs`` lists ``RANKSxTHREADS[:MODE]`` (torch threads per rank; MODE ``batch``, the default, splits
the batch across ranks, ``directions`` splits the q directions, ``--dp-mode``); the default 1x1 1x2 2x1 compares
one process on one and on both cores with two processes of one thread. Prints per configuration the median step
time, its ratio to the first configuration, the payload bytes this rank exchanged per step
(``World.bytes_reduced``: the all-reduced vector, or the all-gathered vectors of every rank; a ring all-reduce
sends about 2(N-1)/N times the payload per rank), the bytes of rank 0's streaming workspaces (noise and scratch
buffers, one block each) and its peak RSS.

Examples::

    python tools/bench_dist.py                          # hidden 256, 4 layers, batch 16, 1x1 1x2 2x1
    python tools/bench_dist.py --configs 1x4 4x1 --batch 32
    python tools/bench_dist.py --q 4 --configs 1x1 2x1 2x1:directions
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class CharTokenizer:
    """One id per character (ids 2..96), pad 1: the benchmark needs no tokenizer files."""

    pad_token_id = eos_token_id = 1

    def __call__(self, texts, add_special_tokens: bool = True):
        return {"input_ids": [[ord(c) % 95 + 2 for c in t] for t in texts]}


def examples(n: int = 256):
    import random

    from zoedge.train.tasks import Example
    rng = random.Random(0)
    words = ["good", "bad", "fine", "poor", "nice", "sad"]
    out = []
    for i in range(n):
        w = rng.choice(words)
        out.append(Example(f"the movie number {i} was {w}, overall it is", (" no", " yes"), int(words.index(w) % 2 == 0)))
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    import zoedge
    from zoedge.train.trainer import Trainer, TrainSettings
    from zoedge.train.world import World
    from zoedge_plugins.mezo import MeZO
    import resource
    world = World.from_env("cpu", check_every=0)
    torch.set_num_threads(args.threads)
    ex = examples()
    t = Trainer(zoedge.load(args.store), CharTokenizer(), MeZO(seed=0, lr=1e-4, eps=1e-3, q=args.q), ex, ex[:4], [],
                TrainSettings(steps=args.warmup + args.steps, batch_size=args.batch, dp_mode=args.mode),
                Path(args.out), progress=False, log=lambda s: None, world=world)
    for _ in range(args.warmup):
        t.train_step()
    times, b0 = [], world.bytes_reduced
    for _ in range(args.steps):
        t0 = time.perf_counter()
        t.train_step()
        times.append(time.perf_counter() - t0)
    if world.is_main:
        workspace = sum(b.numel() * b.element_size() for b in t.model._workspaces.values())
        print(json.dumps({"ranks": world.size, "times": times,
                          "bytes_per_step": (world.bytes_reduced - b0) / args.steps, **t.shares(),
                          "workspace_bytes": workspace,
                          "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
    world.close()


def launch(config: str, args: argparse.Namespace, root: Path) -> dict:
    """One ``torchrun --standalone --nproc-per-node N`` of the worker (config ``NxT[:MODE]``); rank 0's figures."""
    shape, _, mode = config.partition(":")
    n, threads = (int(x) for x in shape.split("x"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), __file__,
           "--worker", "--store", str(root / "store"), "--out", str(root / f"out{n}"), "--threads", str(threads),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--q", str(args.q), "--mode", mode or "batch"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        sys.exit(f"{n} ranks failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"], help="RANKSxTHREADS per rank")
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--q", type=int, default=1, help="MeZO directions per step (default 1)")
    ap.add_argument("--mode", default="batch", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="launches per world size, in alternating order")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import zoedge
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                          max_position_embeddings=256)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "hf")
        zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
        params = sum(p.stat().st_size for p in (root / "store" / "blocks").iterdir()) / 4
        print(f"model: Llama-shaped, hidden {args.hidden}, {args.layers} layers (~{params / 1e6:.1f} M fp32 "
              f"parameters); MeZO, global batch {args.batch}; median of "
              f"{args.steps} steps x {args.rounds} launches; q = {args.q}")
        runs: dict[str, list[dict]] = {c: [] for c in args.configs}
        for k in range(args.rounds):  # alternate the order so that drift of a shared machine hits all alike
            for c in (args.configs if k % 2 == 0 else args.configs[::-1]):
                runs[c].append(launch(c, args, root))
        print(f"| ranks x threads: mode | per-rank batch | per-rank directions | step time (s) | vs {args.configs[0]} | "
              "bytes exchanged per step (payload) | workspaces (MiB) | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|---|---|")
        base = None
        for n in args.configs:
            step_s = statistics.median([t for r in runs[n] for t in r["times"]])
            base = base or step_s
            r = runs[n][0]
            dirs = r.get("per_rank_directions", [args.q] * r["ranks"])
            label = n if ":" in n else f"{n}:batch"
            print(f"| {label} | {r['per_rank_batch']} | {dirs} | {step_s:.3f} | {step_s / base:.2f} | "
                  f"{r['bytes_per_step']:.0f} | {r['workspace_bytes'] / 2**20:.1f} | {r['max_rss_bytes'] / 2**20:.0f} |",
                  flush=True)

if __name__ == "__main__":
    main()
