"""``zoedge eval``: loss and accuracy of a model on a task's dev and test splits."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge eval``."""
    p = subparsers.add_parser("eval", help="evaluate a model (HF dir, store, or the default) on a task")
    p.add_argument("--model", default=None, help="HF dir (e.g. a finetune's OUTPUT/model), store, or default")
    p.add_argument("--task", default=None)
    p.add_argument("--train", default=None, help="JSONL to carve dev/test from (or give --dev/--test)")
    p.add_argument("--dev", default=None)
    p.add_argument("--test", default=None)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-train", type=int, default=1000, help="train share when carving (same split as finetune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tier", choices=("ram", "disk"), default="ram")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(command="eval")


def run(args: argparse.Namespace) -> int:
    from zoedge.train.job import load_splits, run_eval

    train = args.train
    if train is None and (args.dev or args.test):
        train = args.dev or args.test
    splits = load_splits(args.task, train, args.dev, args.test, args.n_train, args.n_dev, args.n_test, args.seed)
    res = run_eval(args.model, splits, args.device, args.tier, args.batch_size, progress=not args.no_progress)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0
