"""Reading data sources into records: JSONL, JSON, CSV, Parquet, ``datasets`` folders and Hub ids.

A source is what ``--train`` / ``--dev`` / ``--test`` name:

* a local file, by its suffix: ``.jsonl`` (and any other suffix: one JSON object per line), ``.json`` (a list
  of objects, or JSON lines), ``.csv`` (a header row), ``.parquet`` (needs ``pyarrow``, which the ``data``
  extra installs);
* a folder written by ``datasets.save_to_disk`` (``DIR`` or ``DIR:split`` for a ``DatasetDict``);
* ``NAME[:split]``, a Hugging Face Hub dataset id, through ``datasets.load_dataset`` (the ``data`` extra;
  offline, ``HF_DATASETS_OFFLINE=1``, only what its cache holds).

Every reader returns ``(where, record)`` pairs: ``where`` names the file and line (``path:3``) or row
(``path row 3``) for error messages. Column renaming (``--columns prompt=question``) is applied here, before the
layout is detected. Nothing here imports torch.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zoedge.errors import ConfigError, DataError

__all__ = ["read_source", "read_jsonl", "parse_columns", "rename_columns", "SOURCE_HELP"]

Row = tuple[str, dict[str, Any]]
_JSONL_FIX = "write one JSON object per line (blank lines are allowed)"
_DATA_EXTRA = 'pip install "zoedge[data]" (or pip install datasets)'
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".txt")
#: the split a DatasetDict gives each option when the source names none
_DEFAULT_SPLITS = {"train": ("train",), "dev": ("validation", "dev", "valid"), "test": ("test",)}
SOURCE_HELP = ("a JSONL, JSON, CSV or Parquet file, a folder written by datasets' save_to_disk (DIR or DIR:split), "
               "or a Hugging Face Hub id NAME[:split] (needs the data extra)")


def read_source(source: str | Path, role: str = "train") -> list[Row]:
    """The records of ``source`` with where each came from, in order.

    Args:
        source: see the module docstring.
        role: ``train``, ``dev`` or ``test``: the split a ``DatasetDict`` gives when ``source`` names none.

    Raises:
        DataError: a missing source, undecodable bytes, malformed lines, no records, or an unreadable dataset.
    """
    text = str(source)
    path = Path(text)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return _nonempty(path, _read_csv(path))
        if suffix == ".parquet":
            return _nonempty(path, _read_parquet(path))
        if suffix == ".json":
            return _nonempty(path, _read_json(path))
        return read_jsonl(path)
    folder, _, split = text.rpartition(":") if ":" in text and not path.exists() else (text, "", "")
    if Path(folder).is_dir() and _is_saved_dataset(Path(folder)):
        return _nonempty(path, _read_saved(Path(folder), split or None, role))
    if path.is_dir():
        raise DataError(path, "is a directory, not a data file or a folder written by datasets' save_to_disk",
                        f"give {SOURCE_HELP}")
    if path.suffix.lower() in _FILE_SUFFIXES or text.startswith(("/", ".", "~")) or not _HUB_ID.match(text):
        raise DataError(path, "does not exist", f"give the path of a local data file ({_JSONL_FIX}), or {SOURCE_HELP}")
    return _nonempty(path, _read_hub(text, role))


def _nonempty(source: Path, rows: list[Row]) -> list[Row]:
    if not rows:
        raise DataError(source, "holds no examples", "give a source with at least one record")
    return rows


def read_jsonl(path: str | Path) -> list[Row]:
    """Read JSON objects, one per line (blank lines skipped), with ``path:line`` for each.

    Raises:
        DataError: missing file, undecodable bytes, malformed JSON or a non-object line.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(path, problem, f"give the path of a local JSONL file ({_JSONL_FIX})")
    out: list[Row] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(where, f"is not valid JSON ({e.msg} at column {e.colno})", _JSONL_FIX) from None
            if not isinstance(obj, dict):
                raise DataError(where, f"holds a JSON {type(obj).__name__}, not an object", _JSONL_FIX)
            out.append((where, obj))
    if not out:
        raise DataError(path, "holds no examples", _JSONL_FIX)
    return out


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(where, f"is not valid UTF-8 ({e.reason})", "save the file as UTF-8") from None


def _read_json(path: Path) -> list[Row]:
    """A JSON list of objects (or ``{"data": [...]}``-style: one list-valued key); JSON lines also work."""
    text = _decode(path.read_bytes(), str(path))
    stripped = text.lstrip()
    if not stripped.startswith("["):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            return read_jsonl(path)  # JSON lines in a .json file
        lists = [v for v in whole.values() if isinstance(v, list)] if isinstance(whole, dict) else []
        if len(lists) != 1:
            return [(f"{path}:1", whole)] if isinstance(whole, dict) else []
        items = lists[0]
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}", f"is not valid JSON ({e.msg} at column {e.colno})",
                            "write a JSON list of objects, or one JSON object per line") from None
    out = []
    for i, obj in enumerate(items, 1):
        if not isinstance(obj, dict):
            raise DataError(f"{path} item {i}", f"is a JSON {type(obj).__name__}, not an object",
                            "write a JSON list of objects")
        out.append((f"{path} item {i}", obj))
    return out


def _read_csv(path: Path) -> list[Row]:
    """Rows of a CSV file with a header row (values are strings; a JSON list in a cell is parsed)."""
    raw = path.read_bytes()
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        _decode(line, f"{path}:{lineno}")
    reader = csv.DictReader(raw.decode("utf-8").splitlines())
    out = []
    try:
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record or any(v is None for v in record.values()):
                raise DataError(where, f"has a different number of cells than the header {reader.fieldnames}",
                                "give every row one cell per header column (quote cells holding commas)")
            if any(v for v in record.values()):
                out.append((where, {k: _cell(v) for k, v in record.items()}))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}", f"is not valid CSV ({e})", "write a CSV file with a header row") from None
    return out


def _cell(value: str) -> Any:
    if value.startswith("[") and value.endswith("]"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(path, "is a Parquet file and pyarrow is not installed", _DATA_EXTRA) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DataError(path, f"is not a readable Parquet file ({e})", "give a Parquet file") from None
    return [(f"{path} row {i}", r) for i, r in enumerate(rows, 1)]


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("datasets", "is not installed (needed for save_to_disk folders and Hub ids)",
                        _DATA_EXTRA) from None
    return datasets


def _pick_split(splits: list[str], split: str | None, role: str, name: str) -> str:
    if split is not None:
        if split not in splits:
            raise DataError(f"{name}:{split}", f"has no split {split!r} (its splits: {splits})",
                            f"use one of {', '.join(f'{name}:{s}' for s in splits)}")
        return split
    for s in _DEFAULT_SPLITS.get(role, ()):
        if s in splits:
            return s
    if len(splits) == 1:
        return splits[0]
    raise DataError(name, f"holds the splits {splits} and none is named for --{role}",
                    f"name one, e.g. --{role} {name}:{splits[0]}")


def _read_saved(folder: Path, split: str | None, role: str) -> list[Row]:
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError / its own errors
        raise DataError(folder, f"is not a readable datasets folder ({e})",
                        "give a folder written by Dataset.save_to_disk") from None
    name = str(folder)
    if isinstance(ds, datasets.DatasetDict):
        split = _pick_split(list(ds), split, role, name)
        ds, name = ds[split], f"{name}:{split}"
    elif split is not None:
        raise DataError(f"{folder}:{split}", "names a split, but the folder holds a single Dataset",
                        f"give --{role} {folder}")
    return [(f"{name} row {i}", dict(r)) for i, r in enumerate(ds, 1)]


def _read_hub(text: str, role: str) -> list[Row]:
    datasets = _datasets()
    name, _, split = text.partition(":")
    offline = os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0") or \
        os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        if split:
            ds = datasets.load_dataset(name, split=split)
        else:
            dd = datasets.load_dataset(name)
            ds = dd[_pick_split(list(dd), None, role, name)] if isinstance(dd, Mapping) else dd
    except DataError:
        raise
    except Exception as e:  # network, missing dataset, missing split: datasets raises many types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = "offline (HF_DATASETS_OFFLINE is set) and not in the datasets cache" if offline else \
            f"could not be loaded from the Hugging Face Hub ({first})"
        raise DataError(text, f"is not a local file and {why}",
                        "give a local file or save_to_disk folder, or load the dataset once with network access "
                        "(unset HF_DATASETS_OFFLINE) so that its cache serves it offline") from None
    return [(f"{text} row {i}", dict(r)) for i, r in enumerate(ds, 1)]


# ----------------------------------------------------------------------------- column renaming
def parse_columns(spec: str | None) -> dict[str, str]:
    """``"prompt=question,completion=answer"`` -> ``{"prompt": "question", "completion": "answer"}``.

    Raises:
        ConfigError: an item that is not FIELD=COLUMN, or a field or column named twice.
    """
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        field, sep, column = (x.strip() for x in item.partition("="))
        if not sep or not field or not column:
            raise ConfigError("--columns", f"{item.strip()!r} is not FIELD=COLUMN",
                              "give the layout's field and your column, e.g. --columns prompt=question,completion=answer")
        if field in out or column in out.values():
            raise ConfigError("--columns", f"names {field if field in out else column!r} twice",
                              "map each field to one column")
        out[field] = column
    return out


def rename_columns(rows: list[Row], columns: Mapping[str, str], option: str = "--columns") -> list[Row]:
    """Records with each mapped column renamed to its layout field (other columns kept).

    Raises:
        DataError: a record without a mapped column, naming where it is.
    """
    if not columns:
        return rows
    out = []
    for where, record in rows:
        missing = [c for c in columns.values() if c not in record]
        if missing:
            given = ",".join(f"{f}={c}" for f, c in columns.items())
            raise DataError(where, f"has no column {missing[0]!r} (asked for by {option} {given}; it has "
                            f"{sorted(record)})", f"fix {option} to name columns the data has")
        renamed = {k: v for k, v in record.items() if k not in columns.values() and k not in columns}
        renamed.update({f: record[c] for f, c in columns.items()})
        out.append((where, renamed))
    return out
