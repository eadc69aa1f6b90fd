"""``zoedge synth SHAPE OUT``: a random-weight Hugging Face checkpoint of a named model shape
(see :mod:`zoedge.plan.shapes`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoedge.commands.values import AMOUNT, COUNT
from zoedge.names import STORE_DTYPES

SHAPE_NAMES = ("opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b", "opt-175b", "llama-2-7b", "llama-2-13b",
               "llama-2-70b", "qwen2-72b", "smollm2-135m")  # == zoedge.plan.shapes.SHAPES (kept here: fast --help)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge synth``."""
    p = subparsers.add_parser(
        "synth", help="write a random-weight checkpoint of a named model shape (for memory/speed figures)",
        description="Write a Hugging Face checkpoint (config.json + one safetensors shard per decoder layer) "
        "with the shape of a published model and random weights (N(0, 0.02) matrices, vectors 1), so that "
        "per-layer memory and time can be measured on a machine that cannot hold the whole model. Memory "
        "stays at one layer's tensors while writing.")
    p.add_argument("shape", metavar="SHAPE", help=f"model shape: {', '.join(SHAPE_NAMES)}")
    p.add_argument("out", metavar="OUT", type=Path, help="directory to write (must not hold a checkpoint)")
    p.add_argument("--layers", type=COUNT, default=None, metavar="K",
                   help="decoder layers to write (default: the model's full depth); figures measured on K layers "
                   "are extrapolated per layer")
    p.add_argument("--dtype", choices=STORE_DTYPES, default="fp32",
                   help="stored dtype of the weights (default: fp32)")
    p.add_argument("--seed", type=AMOUNT, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--tokenizer-from", type=Path, default=None, metavar="DIR",
                   help="copy the tokenizer files of DIR (e.g. the default model's) so `zoedge finetune` runs on OUT")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the summary as JSON ('-' for stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(command="synth")


def run(args: argparse.Namespace) -> int:
    from zoedge.output_dir import check_apart, result_file, write_result
    from zoedge.plan.shapes import write_checkpoint

    target = result_file(args.json, {"--tokenizer-from": args.tokenizer_from})
    check_apart({"OUT": args.out, "--json": target}, {"--tokenizer-from": args.tokenizer_from})
    human = sys.stderr if args.json == "-" else sys.stdout
    summary = write_checkpoint(args.shape, args.out, args.layers, args.dtype, args.seed, args.tokenizer_from,
                               progress=not args.no_progress, log=lambda s: print(s, file=human))
    if args.json == "-":
        print(json.dumps(summary, indent=1))
    elif target is not None:
        write_result(target, json.dumps(summary, indent=1) + "\n")
    return 0
