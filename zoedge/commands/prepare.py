"""``zoedge prepare SRC DST``: repack a Hugging Face checkpoint into a block store (see :mod:`zoedge.store.prepare`).

The summary (blocks written and reused, bytes, time, throughput) is always
printed; ``--json FILE`` also writes it as JSON (``-`` for stdout, in which case
the human-readable lines go to stderr).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from zoedge.errors import ConfigError
from zoedge.settings import PrepareSettings, add_options

RESUME_HINT = "the finished blocks are kept; re-run the same command to resume"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge prepare``."""
    p = subparsers.add_parser(
        "prepare", help="repack a Hugging Face checkpoint into a block store for streaming (once per model)",
        description="Repack the safetensors checkpoint in SRC into a block store in DST: one contiguous, "
        "aligned, checksummed file per streaming unit. SRC is only read. An interrupted run resumes when "
        "re-run with the same arguments; DST must be new, empty, or an earlier prepare of the same SRC "
        "with the same options.")
    p.add_argument("src", metavar="SRC", type=Path, help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("dst", metavar="DST", type=Path, help="block store directory to create or resume")
    add_options(p, PrepareSettings)
    p.set_defaults(command="prepare")


def _check_json_target(path: str | None) -> Path | None:
    """Refuse an unwritable ``--json`` target before the (long) prepare starts."""
    if path is None or path == "-":
        return None
    target = Path(path)
    if target.is_dir():
        raise ConfigError("--json", f"{target} is a directory", "give a file name, e.g. --json prepare.json")
    if not target.parent.is_dir():
        raise ConfigError("--json", f"the directory of {target} does not exist",
                          f"create {target.parent} first or choose another file")
    return target


def run(args: argparse.Namespace) -> int:
    """Run ``prepare``; return 0 (errors are raised as :class:`~zoedge.errors.ZoedgeError`)."""
    from zoedge.settings import from_args

    s, _ = from_args(PrepareSettings, args)
    s.check()
    target = _check_json_target(s.json)
    human = sys.stderr if s.json == "-" else sys.stdout

    from zoedge.store.prepare import atomic_write_bytes, prepare

    summary = prepare(args.src, args.dst, dtype=s.dtype, quant=s.quant, progress=s.progress,
                      log=lambda line: print(line, file=human, flush=True))
    report = {**dataclasses.asdict(summary), "mb_per_s": summary.mb_per_s, "source": str(args.src),
              "dtype": s.dtype, "quant": s.quant}
    text = json.dumps(report, indent=1) + "\n"
    if s.json == "-":
        sys.stdout.write(text)
    elif target is not None:
        try:
            atomic_write_bytes(target, text.encode())
        except OSError as e:
            raise ConfigError("--json", f"cannot write {target} ({e.strerror or e}); the store itself is complete",
                              "choose another file; re-running prepare reuses every block") from None
        print(f"summary written to {target}", file=human)
    return 0
