"""``zoedge eval``: loss and accuracy of a model on a task's dev and test splits.

Takes the same data options as ``zoedge finetune`` and carves the same split.
Given a finetune run (``--model OUTPUT`` or ``--model OUTPUT/model``), every
data option not given takes the run's value, and the dev/test split is checked
against the one recorded in the run's summary.json, so evaluation never runs on
the run's training data.
"""
from __future__ import annotations

import argparse

from zoedge.settings import EvalSettings, add_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge eval`` (options generated from :class:`~zoedge.settings.EvalSettings`)."""
    p = subparsers.add_parser("eval", help="evaluate a model (HF dir, store, finetune run, or the default) on a task",
                              description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    add_options(p, EvalSettings)
    p.set_defaults(command="eval")


def run(args: argparse.Namespace) -> int:
    from zoedge.settings import from_args
    from zoedge.train.job import dumps, run_eval

    settings, given = from_args(EvalSettings, args)
    print(dumps(run_eval(settings, given)))
    return 0
