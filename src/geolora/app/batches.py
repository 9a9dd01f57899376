"""Batching for ``geolora finetune``: length-bucketed epochs and padding.

An epoch's batches are a pure function of ``(seed, epoch)``, so that a resumed run replays them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["epoch_batches", "pad_rows", "steps_per_epoch"]


def pad_rows(rows: list[list[int]], fill: int, left: bool = False) -> Tensor:
    """``rows`` padded with ``fill`` to the longest one (on the left if ``left``), as a long
    tensor of shape ``(len(rows), width)``."""
    width = max(len(row) for row in rows)
    padded = [
        [fill] * (width - len(row)) + row if left else row + [fill] * (width - len(row))
        for row in rows
    ]
    return torch.tensor(padded, dtype=torch.long)


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
    """Batches per epoch: ``ceil(n / batch_size)``."""
    return math.ceil(n_examples / batch_size)
