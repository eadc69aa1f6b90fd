"""Subcommands of the ``zoedge`` command line, one module each (listed in :data:`zoedge.cli.COMMANDS`).

A command module exposes ``add_parser(subparsers) -> None`` and ``run(args) -> int``
(and optionally ``RESUME_HINT``, shown after Ctrl-C). Keep heavy imports
(torch, transformers, the runtime) inside ``run`` so ``zoedge --help`` stays
fast and a broken dependency only breaks the command that needs it.
"""
