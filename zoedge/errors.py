"""Error types. Every error names the culprit, the bad value and the fix.

The CLI turns any :class:`ZoedgeError` into a one-paragraph message and exit
code 2 (bad input) instead of a traceback; everything else is a bug.
"""
from __future__ import annotations

from pathlib import Path


class ZoedgeError(Exception):
    """Base class for errors the user can fix.

    Args:
        what: the culprit (a file, tensor, option or plugin name).
        problem: what is wrong with it, including the bad value.
        fix: what the user should do.
    """

    exit_code = 2

    def __init__(self, what: str | Path, problem: str, fix: str) -> None:
        self.what = str(what)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.what}: {problem}. Fix: {fix}")


class CheckpointError(ZoedgeError):
    """A source checkpoint (safetensors / index / config) is unreadable or inconsistent."""


class StoreError(ZoedgeError):
    """A prepared block store is missing, incomplete or corrupt, or cannot be written."""


class ConfigError(ZoedgeError):
    """A bad option or configuration value."""


class PluginError(ZoedgeError):
    """An optimizer plugin cannot be found, loaded or built."""


class DataError(ZoedgeError):
    """A task or data file is missing or malformed."""


class TrainingError(ZoedgeError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""

    exit_code = 3


class ScheduleError(ZoedgeError):
    """A streamed schedule orders two accesses to one buffer wrongly (found by the race checker)."""
