"""``zoedge synth SHAPE OUT``: a random-weight Hugging Face checkpoint of a named model shape
(see :mod:`zoedge.plan.shapes`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoedge.settings import SynthSettings, add_options

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
    p.add_argument("out", metavar="OUT", type=Path, help="directory to write (absent or empty)")
    add_options(p, SynthSettings)
    p.set_defaults(command="synth")


def run(args: argparse.Namespace) -> int:
    from zoedge.output_dir import check_apart, result_file, write_result
    from zoedge.plan.shapes import write_checkpoint
    from zoedge.settings import from_args

    s, _ = from_args(SynthSettings, args)
    s.check()
    tokenizer_from = Path(s.tokenizer_from) if s.tokenizer_from else None
    target = result_file(s.json, {"--tokenizer-from": tokenizer_from})
    check_apart({"OUT": args.out, "--json": target}, {"--tokenizer-from": tokenizer_from})
    human = sys.stderr if s.json == "-" else sys.stdout
    summary = write_checkpoint(args.shape, args.out, s.layers, s.dtype, s.seed, tokenizer_from,
                               progress=s.progress, log=lambda line: print(line, file=human))
    if s.json == "-":
        print(json.dumps(summary, indent=1))
    elif target is not None:
        write_result(target, json.dumps(summary, indent=1) + "\n")
    return 0
