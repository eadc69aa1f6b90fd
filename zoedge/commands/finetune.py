"""``zoedge finetune``: zeroth-order fine-tuning on the streaming runtime (see :mod:`zoedge.train.job`).

With no arguments: the default SmolLM2-135M-Instruct model on the built-in
``demo`` task with MeZO, on the CPU. Prints dev accuracy before -> after,
steps/s, tokens/s and peak memory; OUTPUT/summary.json holds the same figures
and every effective setting, OUTPUT/metrics.jsonl one line per step,
OUTPUT/curves.png dev accuracy and training loss against steps, OUTPUT/model
the fine-tuned Hugging Face model directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoedge.settings import FinetuneSettings, add_options

RESUME_HINT = "re-run the same command with --resume to continue from the last checkpoint"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge finetune`` (its options are generated from :class:`~zoedge.settings.FinetuneSettings`)."""
    p = subparsers.add_parser("finetune", help="fine-tune a model with a zeroth-order optimizer plugin",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    add_options(p, FinetuneSettings)
    p.set_defaults(command="finetune")


def run(args: argparse.Namespace) -> int:
    from zoedge.errors import ConfigError
    from zoedge.optim.registry import load, options_of, parse_opts
    from zoedge.settings import flag, from_args
    from zoedge.train.job import run_finetune
    from zoedge.train.world import launched_rank

    settings, _ = from_args(FinetuneSettings, args)
    parsed = dict(parse_opts(settings.opt))
    for key in ("lr", "eps", "weight_decay"):
        if getattr(settings, key) is not None:
            known = options_of(load(settings.optimizer))
            if key not in known:
                raise ConfigError(flag(key), f"optimizer '{settings.optimizer}' has no option '{key}' (its options: "
                                  f"{', '.join(known) or 'none'})",
                                  f"drop {flag(key)}, or set the plugin's own options with --opt KEY=VALUE")
    if settings.json and settings.json != "-":
        from zoedge.train.job import check_writable_file
        check_writable_file(Path(settings.json), "--json")
    s = run_finetune(settings, parsed)
    if launched_rank() != 0:  # torchrun / accelerate launch: rank 0 reports for the run
        return 0

    def acc(d: dict | None) -> str:
        return "n/a" if not d or d.get("accuracy") is None else f"{d['accuracy']:.3f}"

    peak = f"{s['peak_gpu_bytes'] / 2**30:.2f} GiB GPU" if s["peak_gpu_bytes"] else "n/a (CPU run)"
    print("\n== zoedge finetune summary ==", file=sys.stderr)
    print(f"dev accuracy {acc(s['dev_before'])} (step {s['start_step']}) -> {acc(s['dev_after'])} (step {s['steps']}); "
          f"test accuracy after {acc(s['test_after'])}\n"
          f"{s['steps_this_run']} steps in {s['seconds']:.1f} s ({s['steps_per_s'] or 0:.2f} steps/s, "
          f"{s['tokens_per_s'] or 0:.0f} tokens/s); peak memory {peak}\n"
          f"model: {s['model_dir'] or 'not exported (--no-export)'}  summary: {settings.output}/summary.json"
          + (f"  curves: {s['plot']}" if s["plot"] else ""), file=sys.stderr)
    from zoedge.train.job import dumps, json_safe, write_atomic
    if settings.json and settings.json != "-":
        write_atomic(Path(settings.json), dumps(s))
    print(dumps(s) if settings.json == "-" else
          json.dumps(json_safe({k: s[k] for k in ("dev_before", "dev_after", "test_after", "steps", "seconds")}),
                     allow_nan=False))
    return 0
