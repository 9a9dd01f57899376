"""Text classification data: the embedded Rotten Tomatoes sentences (see NOTICE.md)."""

from __future__ import annotations

import bz2
import csv
import io
import random
from dataclasses import dataclass
from importlib import resources

__all__ = ["TextSplit", "load_rotten_tomatoes"]

ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}


@dataclass
class TextSplit:
    """Texts with integer labels."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def load_rotten_tomatoes(
    test_fraction: float = 0.2, seed: int = 0, limit: int | None = None
) -> tuple[TextSplit, TextSplit]:
    """The Rotten Tomatoes review sentences (label 1 = fresh, 0 = rotten), shuffled with ``seed``
    and split into train and test; ``limit`` keeps that many sentences before splitting."""
    raw = resources.files(__package__).joinpath(ROTTEN_TOMATOES_FILE).read_bytes()
    rows = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8")))
    pairs = [(row["text"], LABELS[row["category"]]) for row in rows if row["category"] in LABELS]
    random.Random(seed).shuffle(pairs)
    if limit is not None:
        pairs = pairs[:limit]
    n_test = int(round(len(pairs) * test_fraction))
    test, train = pairs[:n_test], pairs[n_test:]
    return (
        TextSplit([t for t, _ in train], [y for _, y in train]),
        TextSplit([t for t, _ in test], [y for _, y in test]),
    )
