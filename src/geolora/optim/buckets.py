"""Which adapters :class:`~geolora.optim.optimizer.GeoLoRAOptimizer` steps together, as one batch.

Adapters can share a batch when they share ``(n, m, r_max, r_min, dtype, device)``. Within that,
an adapter of rank ``rᵢ`` with ``2rᵢ ≤ min(n, m)`` can be zero-padded to any wider rank ``w`` and
stepped with the adapters of rank ``w`` (docs/algorithm.md, "Buckets"); wider ranks have fewer
than ``rᵢ`` new directions and are batched with their own rank only.

Padding is not free: the two QR factorisations of ``[U | D_K]`` (``n × 2w``) and ``[V | D_L]``
(``m × 2w``) cost about ``(n + m)(2w)²`` per adapter, so one adapter at rank 18 makes sixty at
rank 4 pay 20× their own QR. Nor is a batch: each costs a fixed amount of Python and copies.
:func:`group_by_width` splits the sorted ranks into the contiguous groups that minimise

    Σ_groups  ( BUCKET_OVERHEAD + |group| · (n + m) · (2 · max rank of the group)² ),

an exact dynamic programme over the cut points between distinct ranks.
"""

from __future__ import annotations

from collections import defaultdict

from ..layers import GeoLoRALayer

__all__ = ["BUCKET_OVERHEAD", "group_by_width", "plan_buckets"]

BUCKET_OVERHEAD = 4e6
"""The fixed cost of one batch in units of QR work (rows · columns²): about 1.5 ms of Python
and copies per bucket, at the 2–3·10⁹ units per second one CPU core factors thin matrices at."""


def group_by_width(ranks: list[int], rows: int, overhead: float | None = None) -> list[list[int]]:
    """Indices into ``ranks`` grouped into buckets, each padded to its largest rank: the
    partition of the sorted ranks into contiguous runs with the least modelled cost
    ``overhead + len(run) · rows · (2 · max(run))²`` summed over the runs.

    Equal ranks never gain from being split (moving them into the lower run costs no more), so
    the programme runs over the ``d`` distinct ranks: ``O(d²)``, with ``d ≤ r_max``."""
    overhead = BUCKET_OVERHEAD if overhead is None else overhead
    by_rank: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(ranks):
        by_rank[r].append(i)
    widths = sorted(by_rank)
    counts = [0]  # counts[j]: adapters with the j smallest distinct ranks
    for w in widths:
        counts.append(counts[-1] + len(by_rank[w]))
    best, cut = [0.0], [0]  # best[j]: least cost of the j smallest distinct ranks; cut[j]: last cut
    for j in range(1, len(widths) + 1):
        qr = rows * (2 * widths[j - 1]) ** 2
        costs = [best[i] + overhead + (counts[j] - counts[i]) * qr for i in range(j)]
        i = min(range(j), key=costs.__getitem__)
        best.append(costs[i])
        cut.append(i)
    groups, j = [], len(widths)
    while j > 0:
        groups.append([i for w in widths[cut[j] : j] for i in by_rank[w]])
        j = cut[j]
    return groups[::-1]


def plan_buckets(layers: list[GeoLoRALayer]) -> list[list[GeoLoRALayer]]:
    """The adapters of ``layers`` that have a gradient, in buckets to be stepped as one batch
    each: same shape, ``r_max``, ``r_min``, dtype and device; ranks with ``2r ≤ min(n, m)`` split
    by :func:`group_by_width`, larger ranks one bucket per rank."""
    shapes: dict[tuple, list[GeoLoRALayer]] = defaultdict(list)
    for layer in layers:
        u = layer.U
        if u.grad is not None:
            n, m, r = u.shape[0], layer.in_features, layer.current_rank
            width = None if 2 * r <= min(n, m) else r  # None: may be padded
            key = (n, m, width, u.shape[1], min(layer.r_min, layer.r_max), u.dtype, u.device)
            shapes[key].append(layer)
    buckets = []
    for (n, m, width, *_), group in shapes.items():
        if width is not None:
            buckets.append(group)
            continue
        ranks = [layer.current_rank for layer in group]
        buckets += [[group[i] for i in part] for part in group_by_width(ranks, n + m)]
    return buckets
