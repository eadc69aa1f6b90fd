"""``zoedge cache list|prune``: the block stores prepared automatically from ``--model DIR`` checkpoints.

They live in ``$ZOEDGE_CACHE/stores`` (default ``~/.cache/zoedge/stores``), one full store per checkpoint
directory, dtype and quant; see :mod:`zoedge.store.cache`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from zoedge.settings import ListingSettings, PruneSettings, add_options

HELP = ("list or delete the block stores prepared automatically from --model DIR checkpoints; they live in "
        "$ZOEDGE_CACHE/stores (default ~/.cache/zoedge/stores). The converted default model next to it is "
        "not touched.")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge cache``."""
    p = subparsers.add_parser("cache", help="list or prune the prepared stores in the cache", description=HELP)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="one line per store: size, last use, source checkpoint",
                        description="List the cached stores, least recently used first.")
    add_options(ls, ListingSettings)
    pr = sub.add_parser("prune", help="delete stores by age, by unused source, or all",
                        description="Delete cached stores. Give at least one selection; a deleted store is "
                        "prepared again the next time its checkpoint is used.")
    add_options(pr, PruneSettings)
    p.set_defaults(command="cache")


def _mib(n: int) -> str:
    return f"{n / 2**20:9.1f} MiB"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def run(args: argparse.Namespace) -> int:
    from zoedge.output_dir import result_file, write_result
    from zoedge.settings import from_args
    from zoedge.store.cache import cached_stores, prune, select_for_prune, stores_dir
    from zoedge.store.lease import in_use

    stores = cached_stores()
    if args.action == "list":
        listing, _ = from_args(ListingSettings, args)
        target = result_file(listing.json, {})
        text = json.dumps([{"path": str(s.path), "bytes": s.bytes, "source": s.source, "last_used": s.last_used,
                            "complete": s.complete, "source_exists": s.source_exists} for s in stores], indent=1)
        if listing.json == "-":  # instead of the table
            print(text)
            return 0
        if target is not None:
            write_result(target, text + "\n")
        print(f"{len(stores)} stores in {stores_dir()}, {_mib(sum(s.bytes for s in stores)).strip()} in all")
        for s in stores:
            state = "" if s.complete else " (unfinished)"
            gone = "" if s.source_exists else " (source gone)"
            busy = in_use(s.path)
            state += f" (in use by {busy})" if busy else ""
            print(f"{_mib(s.bytes)}  last used {_when(s.last_used)}  {s.path.name}{state}\n"
                  f"{'':13}from {s.source or '?'}{gone}")
        return 0
    sel, _ = from_args(PruneSettings, args)
    sel.check()
    picked = select_for_prune(stores, sel.older_than, sel.unused, sel.all)
    if sel.dry_run:
        kept = [(s, busy) for s in picked if (busy := in_use(s.path))]
        freed = sum(s.bytes for s in picked) - sum(s.bytes for s, _ in kept)
    else:
        freed, kept = prune(picked)
    verb = "would delete" if sel.dry_run else "deleted"
    busy_paths = {s.path for s, _ in kept}
    for s in picked:
        if s.path not in busy_paths:
            print(f"{verb} {s.path} ({_mib(s.bytes).strip()})")
    for s, busy in kept:  # a store in use is never deleted under the process reading it
        print(f"kept {s.path}: in use by {busy} (a running zoedge finetune or eval); prune it after that "
              "process ends", file=sys.stderr)
    print(f"{verb} {len(picked) - len(kept)} of {len(stores)} stores, {_mib(freed).strip()}")
    return 0
