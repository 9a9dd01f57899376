"""Reading example tables for ``geolora finetune``: CSV/TSV/JSONL/JSON files, random splits.

Every problem with a file raises :class:`DataError` naming the file and what to change.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["FILE_SUFFIXES", "DataError", "column", "data_file", "read_rows", "shuffled_split"]

FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
Item = TypeVar("Item")


class DataError(ValueError):
    """A dataset that cannot be used as given; the message says what to change."""


def data_file(dataset: str) -> Path | None:
    """The local file ``dataset`` names, ``None`` if it names none (a hub dataset), or a
    DataError for a missing file or an unknown file type."""
    path = Path(dataset).expanduser()
    if path.suffix.lower() not in FILE_SUFFIXES and not path.exists():
        return None
    if not path.is_file():
        raise DataError(f"Dataset file {path} does not exist.")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(f"{path}: unknown file type; use one of {', '.join(FILE_SUFFIXES)}.")
    return path


def _csv_rows(path: Path, text: str) -> list[dict[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    for row in reader:
        if None in row or None in row.values():
            raise DataError(
                f"{path} line {reader.line_num}: expected {len(reader.fieldnames or [])} "
                f"fields like the header {reader.fieldnames}, found a different number."
            )
        rows.append(row)
    return rows


def _jsonl_rows(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number} is not valid JSON: {err.msg}.") from err
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is not a JSON object: {line[:60]!r}.")
        rows.append(row)
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The examples of a ``.csv``/``.tsv`` (header row), ``.jsonl`` (one object per line) or
    ``.json`` (a list of objects) file, one dict per example."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}).") from err
    if not text.strip():
        raise DataError(f"{path} is empty.")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path, text)
    if suffix == ".jsonl":
        return _jsonl_rows(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}.") from err
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise DataError(f"{path} must hold a JSON list of objects (one per example).")
    return data


def column(rows: list[dict[str, Any]], key: str, source: str, option: str) -> list[Any]:
    """The values of column ``key`` (none missing or empty); ``option`` is the flag that names
    the column, for the error message."""
    columns = list(rows[0]) if rows else []
    for number, row in enumerate(rows, start=1):
        if key not in row:
            where = "" if number == 1 else f" (example {number})"
            raise DataError(
                f"{source} has no column {key!r}{where}; its columns are {columns}: "
                f"pass {option} with one of them."
            )
        if row[key] is None or row[key] == "":
            raise DataError(f"{source} example {number} has an empty {key!r} value.")
    return [row[key] for row in rows]


def shuffled_split(
    items: Sequence[Item], eval_fraction: float, seed: int, limit: int | None, source: str
) -> tuple[list[Item], list[Item]]:
    """Shuffle with ``seed``, keep the first ``limit``, hold out ``round(eval_fraction · n)``
    examples (at least one)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    n_eval = max(1, int(round(len(order) * eval_fraction)))
    train = [items[i] for i in order[n_eval:]]
    held = [items[i] for i in order[:n_eval]]
    if not train or not held:
        raise DataError(
            f"{source} has {len(order)} examples, too few for a training and a held-out split."
        )
    return train, held
