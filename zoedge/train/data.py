"""A run's data, read and checked before the model is loaded.

Two phases, both before any weight is read:

1. :func:`read_data` (no tokenizer, no torch): every source is read, its columns renamed (``--columns``), its
   layout found (``--task`` or detected on the training source; dev and test follow the training layout) and
   every record checked for the layout's fields. A bad file fails here, naming file and line.
2. :meth:`RawData.splits` (the tokenizer only): the templates (chat rendering for ``messages``), every example's
   token length against ``--max-length``, then the split (which drops dev / test examples that are in the
   training split and refuses a dev / test source wholly inside it: :func:`~zoedge.train.sampling.disjoint`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zoedge.errors import ConfigError, DataError
from zoedge.train.sources import parse_columns
from zoedge.train.tasks import (BUILTIN_TASKS, TOKEN_LAYOUTS, Example, Splits, build_examples, builtin_task,
                                load_records, split)

log = logging.getLogger(__name__)
__all__ = ["RawData", "read_data", "loss_kind"]

ROLES = ("train", "dev", "test")


@dataclass
class RawData:
    """Records of each given source (phase 1), or a built-in task."""

    layout: str | None  # None: a built-in task
    builtin: str | None = None
    rows: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)  # role -> [(where, record)]
    sources: dict[str, str] = field(default_factory=dict)  # role -> source as given

    @property
    def loss_kind(self) -> str:
        """``token`` (LM loss on answer / text tokens) or ``classification``."""
        return loss_kind(self.layout)

    def examples(self, tokenizer: Any, max_length: int | None) -> dict[str, list[Example]]:
        """Phase 2: every given source's examples, each checked against ``max_length``.

        Raises:
            DataError: naming where a record fails its template or is too long.
        """
        out: dict[str, list[Example]] = {}
        for role, rows in self.rows.items():
            assert self.layout is not None
            examples = build_examples(rows, self.layout, tokenizer)
            if max_length is not None:
                check_lengths(tokenizer, examples, [w for w, _ in rows], max_length)
            out[role] = examples
        return out

    def splits(self, data: Any, tokenizer: Any) -> Splits:
        """The train / dev / test split of ``data`` (:class:`~zoedge.settings.DataOptions`); without a training
        source (eval of a file alone) the given sources whole, capped at ``--n-dev`` / ``--n-test``."""
        if self.builtin is not None:
            return split(builtin_task(self.builtin, seed=0), data.n_train, data.n_dev, data.n_test, data.seed)
        ex = self.examples(tokenizer, data.max_length)
        if "train" not in ex:
            return Splits([], ex.get("dev", [])[:data.n_dev], ex.get("test", [])[:data.n_test])
        return split(ex["train"], data.n_train, data.n_dev, data.n_test, data.seed, dev=ex.get("dev"),
                     test=ex.get("test"))


def loss_kind(layout: str | None) -> str:
    """``token`` for the token-level layouts (:data:`~zoedge.train.tasks.TOKEN_LAYOUTS`), else ``classification``."""
    return "token" if layout in TOKEN_LAYOUTS else "classification"


def read_data(data: Any, need_train: bool = True) -> RawData:
    """Phase 1 for :class:`~zoedge.settings.DataOptions` ``data`` (see the module docstring).

    Args:
        need_train: refuse dev/test without a training source (finetune); eval takes them alone.

    Raises:
        ConfigError: options that do not fit together; DataError: a bad source, naming file and line.
    """
    columns = parse_columns(getattr(data, "columns", None))
    if data.train is None and not (data.dev or data.test):
        name = data.task or "demo"
        if name not in BUILTIN_TASKS:
            raise ConfigError("--task", f"{name!r} is not a built-in task and no --train file was given",
                              f"use --task {' / '.join(BUILTIN_TASKS)}, or give --train FILE.jsonl")
        if columns:
            raise ConfigError("--columns", "renames the columns of data files, and none is given",
                              "give --train FILE, or drop --columns")
        return RawData(None, builtin=name)
    if data.train is None and need_train:
        raise ConfigError("--train", "is missing but --dev/--test are given",
                          "give --train FILE as well (dev/test are never carved from each other)")
    if data.task in BUILTIN_TASKS:  # a built-in task has no files: it would be ignored
        raise ConfigError("--task", f"{data.task!r} is a built-in task, but --train {data.train} is given",
                          "drop --task (the layout of the file is detected) or give the file's layout (e.g. --task "
                          "completion), or drop --train to use the built-in task")
    layout = data.task
    raw = RawData(layout)
    for role in ROLES:
        source = getattr(data, role)
        if source:
            found, rows = load_records(source, raw.layout, columns, role)
            raw.layout = raw.layout or found  # dev and test follow the first source's layout
            raw.rows[role], raw.sources[role] = rows, str(source)
    return raw


def check_lengths(tokenizer: Any, examples: Sequence[Example], wheres: Sequence[str], max_length: int) -> None:
    """Every example fits ``max_length`` tokens (classification: prompt may lose tokens from its left; see
    :func:`~zoedge.train.batching.collate`).

    Raises:
        DataError: naming where the first example that does not fit is, and the fix.
    """
    from zoedge.train.batching import collate  # torch: only once the data is read

    for start in range(0, len(examples), 64):
        chunk = examples[start:start + 64]
        try:
            collate(tokenizer, chunk, max_length)
        except DataError:
            for i, e in enumerate(chunk):
                try:
                    collate(tokenizer, [e], max_length)
                except DataError as err:
                    raise DataError(wheres[start + i], f"is too long: {err.problem}",
                                    f"{err.fix} (--max-length {max_length} now)") from None
            raise
