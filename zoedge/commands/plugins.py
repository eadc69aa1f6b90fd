"""``zoedge plugins [NAME ...]``: list the optimizer plugins, their distribution, description and options.

Discovery (:func:`zoedge.optim.registry.available`) imports nothing; showing the
options needs each plugin's class, so every listed plugin is imported inside its
own try/except and a failing one is shown as ``BROKEN: <error>`` while the
others are listed normally.

Exit codes: 0 when at least one listed plugin loads (broken ones are reported,
not fatal: one bad third-party package must not hide the working ones); 1 when
none loads (or none is installed), or when a plugin named on the command line is broken (asking about
it means you care); 2 for an unknown NAME.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from zoedge.settings import ListingSettings, add_options

EPILOG = ("exit status: 0 if at least one listed plugin loads; 1 if none does, or if a plugin named "
          "on the command line is broken; 2 for an unknown name")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge plugins``."""
    p = subparsers.add_parser(
        "plugins", help="list the optimizer plugins and their options",
        description="List the optimizer plugins (installed entry points of the group 'zoedge.optimizers' "
        "and plugins registered in this process): name, distribution, description and options "
        "(--opt KEY=VALUE) with their defaults. A plugin that fails to load is shown as BROKEN with the "
        "reason.", epilog=EPILOG)
    p.add_argument("names", metavar="NAME", nargs="*",
                   help="only these plugins (a registry name or an import path package.module:Class)")
    add_options(p, ListingSettings)


def describe(name: str) -> dict[str, Any]:
    """One plugin as a JSON-able dict; ``error`` is set (and options empty) when it cannot be loaded.

    Raises:
        PluginError: unknown ``name``.
    """
    from zoedge.errors import PluginError
    from zoedge.optim.registry import description_of, load, lookup, options_of

    info = lookup(name)
    entry: dict[str, Any] = {"name": name, "value": info.value, "origin": info.origin,
                             "distribution": info.distribution, "version": info.version,
                             "description": info.description, "options": [], "error": None}
    try:
        cls = load(name)
        entry["description"] = description_of(cls)
        entry["options"] = [{"name": o.name, "type": o.type_name, "default": o.default, "help": o.help}
                            for o in options_of(cls).values()]
    except PluginError as e:
        entry["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - a plugin's own bug (e.g. in a property) must not end the listing
        entry["error"] = f"{type(e).__name__}: {e}"
    return entry


def _table(entries: list[dict[str, Any]]) -> str:
    from zoedge.optim.registry import cli_text

    if not entries:
        return "no optimizer plugins found (install a distribution with a 'zoedge.optimizers' entry point)"
    rows = [(e["name"], _source(e), f"BROKEN: {e['error']}" if e["error"] else e["description"]) for e in entries]
    w0 = max(len("NAME"), *(len(r[0]) for r in rows))
    w1 = max(len("DISTRIBUTION"), *(len(r[1]) for r in rows))
    lines = [f"{'NAME':<{w0}}  {'DISTRIBUTION':<{w1}}  DESCRIPTION"]
    for (name, source, text), e in zip(rows, entries):
        lines.append(f"{name:<{w0}}  {source:<{w1}}  {text}")
        opts = e["options"]
        if opts:
            shown = [f"{o['name']}={cli_text(o['default'])}" for o in opts]
            wk = max(len(s) for s in shown)
            for s, o in zip(shown, opts):
                lines.append(f"{'':<{w0}}    --opt {s:<{wk}}  ({o['type']}){'  ' + o['help'] if o['help'] else ''}")
    return "\n".join(lines)


def _source(e: dict[str, Any]) -> str:
    if e["origin"] == "entry point":
        return f"{e['distribution']}=={e['version']}"
    return "(registered)" if e["origin"] == "registered" else "(import path)"


def run(args: argparse.Namespace) -> int:
    """List the plugins; see the module docstring for the exit status."""
    from zoedge.optim.registry import available
    from zoedge.output_dir import result_file, write_result
    from zoedge.settings import from_args

    s, _ = from_args(ListingSettings, args)
    target = result_file(s.json, {})
    names = list(args.names) if args.names else list(available())
    entries = [describe(n) for n in names]  # unknown NAME: PluginError → exit 2 from the CLI
    text = json.dumps(entries, indent=2, default=str)  # a list of plugin objects
    if s.json == "-":  # instead of the table
        print(text)
    else:
        print(_table(entries))
        if target is not None:
            write_result(target, text + "\n")
    broken = [e["name"] for e in entries if e["error"]]
    if broken:
        print(f"{len(broken)} plugin(s) failed to load: {', '.join(broken)} (shown as BROKEN above)",
              file=sys.stderr)
    if args.names:
        return 1 if broken else 0
    return 0 if len(broken) < len(entries) else 1
