"""Text classification data for ``geolora finetune``: loading, tokenization and batching.

Sources: the embedded Rotten Tomatoes sentences (:func:`geolora.data.load_rotten_tomatoes`), a
CSV/TSV/JSONL/JSON file with a text column and a label column (and optionally a second text
column for sentence pairs), or a Hugging Face dataset by name (``glue/sst2``; needs the
``datasets`` package and a reachable hub). Every problem with the data raises :class:`DataError`
naming the file and what to change.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..data import load_rotten_tomatoes
from .batches import pad_rows
from .tables import FILE_SUFFIXES, DataError, column, data_file, read_rows, shuffled_split

__all__ = [
    "DataError",
    "EncodedTexts",
    "LabeledTexts",
    "TextTask",
    "encode",
    "load_task",
]

ROTTEN_TOMATOES = "rotten_tomatoes"
ROTTEN_TOMATOES_LABELS = ["rotten", "fresh"]


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


# --- loading ---------------------------------------------------------------------------
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

    found = sorted({str(v) for v in values})
    if len(found) < 2:
        raise DataError(f"{source} has a single label value {found}; need at least two classes.")
    ints = [as_int(v) for v in values]
    if all(i is not None and i >= 0 for i in ints):
        return ints, [str(i) for i in range(max(ints) + 1)]
    index = {name: i for i, name in enumerate(found)}
    return [index[str(v)] for v in values], found


def _from_rows(
    rows: list[dict[str, Any]],
    source: str,
    text_column: str,
    label_column: str,
    pair_column: str | None,
) -> tuple[LabeledTexts, list[str]]:
    if not rows:
        raise DataError(f"{source} holds no examples.")
    texts = [str(t) for t in column(rows, text_column, source, "--text-column")]
    pairs = None
    if pair_column is not None:
        pairs = [str(t) for t in column(rows, pair_column, source, "--text-pair-column")]
    labels, names = _label_ids(column(rows, label_column, source, "--label-column"), source)
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
    path = data_file(dataset)
    if path is not None:
        rows = read_rows(path)
        data, names = _from_rows(rows, str(path), text_column, label_column, pair_column)
        train, held = shuffled_split(range(len(data)), eval_fraction, seed, limit, str(path))
        return TextTask(data.take(train), data.take(held), names, str(path))
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
        out = {}
        for key, rows in self.features.items():
            fill = self.pad_id if key == "input_ids" else 0
            out[key] = pad_rows([rows[i] for i in indices], fill, self.pad_left)
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
