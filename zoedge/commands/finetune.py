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

DATA_HELP = """data layouts (one record of each; --task names one, else it is detected from the fields):
  completion: loss on the completion and an appended EOS; messages: the tokenizer's chat template, loss on the
  assistant turns; text: loss on every token, rows longer than --max-length truncated; generation: loss on the
  answer; the others are classification (the candidate with the highest mean log-probability is the prediction).
  Token-level layouts also report perplexity and the exact match / token F1 of greedy answers.
"""
RESUME_HINT = "re-run the same command with --resume to continue from the last checkpoint"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge finetune`` (its options are generated from :class:`~zoedge.settings.FinetuneSettings`)."""
    from zoedge.train.tasks import layouts_help
    p = subparsers.add_parser("finetune", help="fine-tune a model with a zeroth-order optimizer plugin",
                              description=__doc__.split("\n\n")[1] if __doc__ else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATA_HELP + layouts_help())
    add_options(p, FinetuneSettings)
    p.set_defaults(command="finetune")


def run(args: argparse.Namespace) -> int:
    from zoedge.settings import from_args
    from zoedge.train.data import read_data

    settings, _ = from_args(FinetuneSettings, args)
    raw = read_data(settings)  # data first: before torch, the plugin or the model are imported or read

    from zoedge.errors import ConfigError
    from zoedge.optim.registry import load, options_of, parse_opts
    from zoedge.settings import flag
    from zoedge.train.job import run_finetune
    from zoedge.train.world import launched_rank

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
    s = run_finetune(settings, parsed, raw)
    if launched_rank() != 0:  # torchrun / accelerate launch: rank 0 reports for the run
        return 0

    from zoedge.train.trainer import describe

    peak = f"{s['peak_gpu_bytes'] / 2**30:.2f} GiB GPU" if s["peak_gpu_bytes"] else "n/a (CPU run)"
    print("\n== zoedge finetune summary ==", file=sys.stderr)
    print(f"dev (step {s['start_step']}): {describe(s['dev_before'])}\ndev (step {s['steps']}): {describe(s['dev_after'])}\n"
          + (f"test: {describe(s['test_after'])}\n" if s["test_after"] else "") +
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
