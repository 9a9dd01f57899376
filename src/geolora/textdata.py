"""Text classification data for ``geolora finetune``: loading, tokenization and batching.

Sources: the embedded Rotten Tomatoes sentences (:func:`geolora.data.load_rotten_tomatoes`), a
CSV/TSV/JSONL/JSON file with a text column and a label column (and optionally a second text
column for sentence pairs), or a Hugging Face dataset by name (``glue/sst2``; needs the
``datasets`` package and a reachable hub). Every problem with the data raises :class:`DataError`
naming the file and what to change.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data import load_rotten_tomatoes

__all__ = [
    "DataError",
    "EncodedTexts",
    "LabeledTexts",
    "TextTask",
    "encode",
    "epoch_batches",
    "load_task",
    "steps_per_epoch",
]

FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
ROTTEN_TOMATOES = "rotten_tomatoes"
ROTTEN_TOMATOES_LABELS = ["rotten", "fresh"]


class DataError(ValueError):
    """A dataset that cannot be used as given; the message says what to change."""


@dataclass
class LabeledTexts:
    """Texts (and optional second texts of a pair) with integer labels."""

    texts: list[str]
    labels: list[int]
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: list[int]) -> LabeledTexts:
        pairs = None if self.pairs is None else [self.pairs[i] for i in indices]
        return LabeledTexts(
            [self.texts[i] for i in indices], [self.labels[i] for i in indices], pairs
        )


@dataclass
class TextTask:
    """A training split, a held-out split and the names of the labels (index = label id)."""

    train: LabeledTexts
    eval: LabeledTexts
    label_names: list[str]
    source: str


# --- loading -------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}).") from err
    if not text.strip():
        raise DataError(f"{path} is empty.")
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
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
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}.") from err
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            raise DataError(f"{path} must hold a JSON list of objects (one per example).")
        return data
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


def _column(rows: list[dict[str, Any]], key: str, source: str, option: str) -> list[Any]:
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


def _label_ids(values: list[Any], source: str) -> tuple[list[int], list[str]]:
    """Integer labels ``0..K-1`` kept as they are; any other labels are sorted and numbered."""

    def as_int(value: Any) -> int | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return None

    ints = [as_int(v) for v in values]
    if all(i is not None and i >= 0 for i in ints):
        names = [str(i) for i in range(max(ints) + 1)]
        labels = ints
    else:
        names = sorted({str(v) for v in values})
        index = {name: i for i, name in enumerate(names)}
        labels = [index[str(v)] for v in values]
    if len(set(labels)) < 2:
        raise DataError(f"{source} has a single label value {names}; need at least two classes.")
    return labels, names


def _shuffled_split(
    data: LabeledTexts, eval_fraction: float, seed: int, limit: int | None
) -> tuple[LabeledTexts, LabeledTexts]:
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    n_eval = int(round(len(order) * eval_fraction))
    return data.take(order[n_eval:]), data.take(order[:n_eval])


def _from_rows(
    rows: list[dict[str, Any]],
    source: str,
    text_column: str,
    label_column: str,
    pair_column: str | None,
) -> tuple[LabeledTexts, list[str]]:
    if not rows:
        raise DataError(f"{source} holds no examples.")
    texts = [str(t) for t in _column(rows, text_column, source, "--text-column")]
    pairs = None
    if pair_column is not None:
        pairs = [str(t) for t in _column(rows, pair_column, source, "--text-pair-column")]
    labels, names = _label_ids(_column(rows, label_column, source, "--label-column"), source)
    return LabeledTexts(texts, labels, pairs), names


def _load_hf(
    name: str,
    text_column: str,
    label_column: str,
    pair_column: str | None,
    eval_fraction: float,
    seed: int,
    limit: int | None,
) -> TextTask:
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{name!r} is neither an existing file nor loadable: Hugging Face datasets need the "
            "`datasets` package (pip install datasets). Local files must end in "
            f"{', '.join(FILE_SUFFIXES)}."
        ) from err
    try:
        loaded = datasets.load_dataset(*name.split("/", 1))
    except Exception as err:  # the hub raises many types; all mean "cannot load this name"
        raise DataError(
            f"Could not load the Hugging Face dataset {name!r}: {str(err).splitlines()[0]} "
            "(offline? pass a local CSV/JSONL file instead)."
        ) from err
    held_out = next((s for s in ("validation", "test") if s in loaded and s != "train"), None)
    if "train" not in loaded or held_out is None:
        raise DataError(f"{name!r} needs a 'train' and a 'validation' or 'test' split.")
    parts = []
    for split in ("train", held_out):
        rows = loaded[split].to_list()
        parts.append(_from_rows(rows, f"{name}[{split}]", text_column, label_column, pair_column))
    (train, _), (held, _) = parts
    feature = loaded["train"].features.get(label_column)
    names = list(getattr(feature, "names", None) or parts[0][1])
    if limit is not None:
        n_eval = int(round(limit * eval_fraction))
        rng = random.Random(seed)
        train = train.take(rng.sample(range(len(train)), min(len(train), limit - n_eval)))
        held = held.take(rng.sample(range(len(held)), min(len(held), n_eval)))
    return TextTask(train, held, names, f"{name} ({held_out} split held out)")


def load_task(
    dataset: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    pair_column: str | None = None,
    eval_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
) -> TextTask:
    """Load a classification task and split off ``eval_fraction`` of it as the held-out set.

    ``dataset`` is ``None`` (or ``"rotten_tomatoes"``) for the embedded Rotten Tomatoes sentences,
    a path to a ``.csv``/``.tsv``/``.jsonl``/``.json`` file, or a Hugging Face dataset name.
    ``limit`` keeps at most that many examples (drawn at random with ``seed``) before the split.
    Labels that are all non-negative integers are used as they are; otherwise the distinct values
    are sorted and numbered.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must lie in (0, 1), got {eval_fraction}.")
    if limit is not None and limit < 2:
        raise DataError(f"limit must be at least 2 examples, got {limit}.")
    if dataset is None or dataset == ROTTEN_TOMATOES:
        train, test = load_rotten_tomatoes(test_fraction=eval_fraction, seed=seed, limit=limit)
        return TextTask(
            LabeledTexts(train.texts, train.labels),
            LabeledTexts(test.texts, test.labels),
            list(ROTTEN_TOMATOES_LABELS),
            "Rotten Tomatoes sentences (embedded)",
        )
    path = Path(dataset).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"Dataset file {path} does not exist.")
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise DataError(f"{path}: unknown file type; use one of {', '.join(FILE_SUFFIXES)}.")
        rows = _read_rows(path)
        data, names = _from_rows(rows, str(path), text_column, label_column, pair_column)
        train, held = _shuffled_split(data, eval_fraction, seed, limit)
        if len(train) == 0 or len(held) == 0:
            raise DataError(
                f"{path} has {len(data)} examples, too few for a training and a held-out split."
            )
        return TextTask(train, held, names, str(path))
    return _load_hf(dataset, text_column, label_column, pair_column, eval_fraction, seed, limit)


# --- tokenization and batching -------------------------------------------------------------
@dataclass
class EncodedTexts:
    """Token ids (unpadded, one list per example) and labels, padded per batch by :meth:`batch`."""

    features: dict[str, list[list[int]]]
    labels: list[int]
    pad_id: int
    pad_left: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.features["input_ids"]]

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """Tensors for ``indices``, padded to the longest example: ``input_ids`` with the pad
        token, ``attention_mask`` and the other features with 0."""
        width = max(len(self.features["input_ids"][i]) for i in indices)
        out = {}
        for key, rows in self.features.items():
            fill = self.pad_id if key == "input_ids" else 0
            padded = []
            for i in indices:
                pad = [fill] * (width - len(rows[i]))
                padded.append(pad + rows[i] if self.pad_left else rows[i] + pad)
            out[key] = torch.tensor(padded, dtype=torch.long)
        out["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return out


def encode(tokenizer: Any, data: LabeledTexts, max_length: int) -> EncodedTexts:
    """Tokenize once (truncating to ``max_length`` tokens), without padding."""
    encoded = tokenizer(data.texts, data.pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedTexts(
        {k: list(encoded[k]) for k in keys},
        list(data.labels),
        pad_id,
        getattr(tokenizer, "padding_side", "right") == "left",
    )


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 50
) -> list[list[int]]:
    """The batches of one epoch, a pure function of ``(seed, epoch)`` so that a resumed run
    replays them. Examples are shuffled, sorted by length inside windows of ``group`` batches
    (less padding, hence less compute) and the batches are shuffled again."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)
