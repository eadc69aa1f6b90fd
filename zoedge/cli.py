"""The ``zoedge`` command line: one argparse subcommand per module in :mod:`zoedge.commands`.

Each name in :data:`COMMANDS` is a module ``zoedge.commands.<name>`` with

* ``add_parser(subparsers) -> None``: register its subcommand (and options);
* ``run(args) -> int``: do the work, return the exit code;
* optionally ``RESUME_HINT: str``: printed after Ctrl-C (e.g. "re-run to resume");

``-v`` / ``-q`` (before or after the command) set the level of zoedge's loggers, shown on stderr.

Command modules keep their heavy imports (torch, transformers) inside ``run``,
so building the parser (``zoedge --help``) costs only the imports of the
``zoedge`` package itself. A command module that fails to import is replaced by
a stub that reports the failure when, and only when, that command is used; the
other commands keep working.

Exit codes: 0 success; :attr:`ZoedgeError.exit_code` for errors the user can
fix (2 bad input, 3 training stopped); 2 for argparse usage errors and a full disk
(an ``OSError`` ENOSPC / EDQUOT that no command named itself); 130 after Ctrl-C, 143 after SIGTERM (handled like
Ctrl-C: the command stops where it is, its writes are atomic, a second SIGTERM ends it at once). Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import signal
import sys
import threading
from types import ModuleType

from zoedge.errors import ConfigError, ZoedgeError

#: Subcommand modules under ``zoedge.commands``, in the order ``--help`` lists them.
COMMANDS: list[str] = ["prepare", "finetune", "eval", "generate", "plugins", "synth", "plan", "memory", "bench", "cache"]

PROG = "zoedge"
INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd program
TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM, so it unwinds like Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


class _Unavailable:
    """Stands in for a command module that failed to import; fails only when its command is run."""

    def __init__(self, name: str, error: BaseException) -> None:
        self.name = name
        self.error = error

    def add_parser(self, subparsers: argparse._SubParsersAction) -> None:
        reason = f"{type(self.error).__name__}: {self.error}"
        # No options of its own; main() lets any arguments through so the real error is shown.
        subparsers.add_parser(self.name, help=f"(unavailable: {reason})", add_help=False)

    def run(self, args: argparse.Namespace) -> int:
        raise ConfigError(f"command {self.name!r}",
                          f"cannot be loaded (zoedge.commands.{self.name} raised "
                          f"{type(self.error).__name__}: {self.error})",
                          "reinstall zoedge or fix that module; the other commands are unaffected")


def _load(name: str) -> ModuleType | _Unavailable:
    """Import ``zoedge.commands.<name>``; a failure becomes an :class:`_Unavailable` stub."""
    try:
        module = importlib.import_module(f"zoedge.commands.{name}")
    except Exception as e:  # noqa: BLE001 - any import failure must not take the other commands down
        return _Unavailable(name, e)
    if not (callable(getattr(module, "add_parser", None)) and callable(getattr(module, "run", None))):
        return _Unavailable(name, AttributeError("module defines no add_parser(subparsers) and run(args)"))
    return module


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType | _Unavailable]]:
    """The top-level parser and the loaded command modules by name.

    Returns:
        ``(parser, modules)``; every subparser sets ``args.command`` to its name.
    """
    from zoedge import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Zeroth-order fine-tuning of language models far larger than the GPU, "
        "by streaming the model through the GPU one block at a time.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_verbosity(parser, default=0)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    modules: dict[str, ModuleType | _Unavailable] = {}
    for name in COMMANDS:
        module = _load(name)
        try:
            module.add_parser(subparsers)
        except Exception as e:  # noqa: BLE001 - a broken add_parser is a broken module, not a broken CLI
            module = _Unavailable(name, e)
            if name not in subparsers.choices:
                module.add_parser(subparsers)
        modules[name] = module
    for sub in subparsers.choices.values():
        if sub.add_help:  # not an _Unavailable stub, which takes any argument
            _add_verbosity(sub, default=argparse.SUPPRESS)
    return parser, modules


def _add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v`` (repeatable) and ``-q``: both add to ``args.verbosity`` (``-q`` takes one away)."""
    g = parser.add_argument_group("logging")
    g.add_argument("-v", "--verbose", dest="verbosity", action="count", default=default,
                   help="show zoedge's log messages: -v info, -vv debug too")
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                   help="show errors only (no warnings)")


#: ``args.verbosity`` -> the level of the ``zoedge`` logger
LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}


def setup_logging(verbosity: int) -> None:
    """Show zoedge's loggers on stderr at the level ``verbosity`` asks for (0: warnings; 2 or more: debug)."""
    log = logging.getLogger("zoedge")
    log.setLevel(LEVELS.get(verbosity, logging.DEBUG))
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s (%(name)s)"))
        log.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each message (so a later redirect of stderr is followed)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ sets it; sys.stderr is used instead
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the ``zoedge`` command line.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code (``--help`` and usage errors return instead of exiting too).
    """
    parser, modules = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not isinstance(modules.get(args.command), _Unavailable):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed what it needed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    setup_logging(args.verbosity)
    for message in getattr(args, "deprecations", []):
        logging.getLogger("zoedge.cli").warning(message)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    module = modules[args.command]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        if getattr(args, "print_config", None):
            return _print_config(args)
        return int(module.run(args) or 0)
    except ZoedgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a full disk is not a bug: every write zoedge does not name itself still gets a message
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        hint = getattr(module, "RESUME_HINT", "")
        print(f"error: {err.filename or 'a file'}: cannot be written (the disk is full). Fix: free disk space, then "
              f"{hint or 'run the command again'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        hint = getattr(module, "RESUME_HINT", "")
        how = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        print(f"\ninterrupted: `{PROG} {args.command}` was stopped ({how})" + (f"; {hint}" if hint else ""),
              file=sys.stderr)
        return TERMINATED if isinstance(stop, Terminated) else INTERRUPTED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _print_config(args: argparse.Namespace) -> int:
    """``--print-config``: the command's effective settings (defaults < --config < command line), checked."""
    from zoedge.settings import dump_config, from_args

    settings, _ = from_args(args.settings_class, args)
    settings.check()
    print(dump_config(settings, args.print_config), end="")
    return 0


if __name__ == "__main__":  # python -m zoedge.cli ...
    sys.exit(main())
