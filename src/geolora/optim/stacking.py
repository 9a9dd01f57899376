"""Batched copies into the fixed-size factors of many layers at once (for the optimizer's buckets):
one multi-tensor copy per call (``torch._foreach_copy_`` where torch has it) instead of one
Python call per tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._torch_compat import foreach_copy_
from ..layers.base import GeoLoRALayer

__all__ = ["WHOLE_COPY_BYTES", "copy_whole", "set_stacked_factors", "write_leading"]


WHOLE_COPY_BYTES = 16 * 1024
"""Batched reads and writes of fixed-size tensors (factors, optimizer state) copy whole tensors,
one call for many layers, when the inactive part is smaller than this; otherwise they use one
view of the leading part per tensor, which costs a Python call each but moves far less memory."""


def copy_whole(t: Tensor, rows: int, cols: int) -> bool:
    """Whether to copy all of ``t`` rather than its leading ``rows × cols`` part (see
    :data:`WHOLE_COPY_BYTES`)."""
    return (t.numel() - rows * cols) * t.element_size() < WHOLE_COPY_BYTES


@torch.no_grad()
def write_leading(targets: Sequence[Sequence[Tensor]], sources: Sequence[Tensor]) -> None:
    """For each ``j``, write ``sources[j][i]`` (a stack along dim 0) into the leading rows and
    columns of the fixed-size tensor ``targets[j][i]``. The rest of each target must already be
    zero (the storage invariant, when the sources are at least as wide as the active part); it
    is left alone or, for whole-tensor copies, written as zeros again."""
    whole, whole_src, part, part_src = [], [], [], []
    for ts, x in zip(targets, sources):
        rows, cols = x.shape[-2:]
        if copy_whole(ts[0], rows, cols):
            whole += ts
            pad = (0, ts[0].shape[-1] - cols, 0, ts[0].shape[-2] - rows)
            whole_src += nn.functional.pad(x, pad).unbind()
        else:
            part += [t[:rows, :cols] for t in ts]
            part_src += x.unbind()
    if whole or part:
        foreach_copy_(whole + part, whole_src + part_src)


@torch.no_grad()
def set_stacked_factors(
    layers: Sequence[GeoLoRALayer], u: Tensor, s: Tensor, v: Tensor, ranks: Sequence[int]
) -> None:
    """Write the factors of layers of one shape at once: ``u`` (B, n, k), ``s`` (B, k, k) and
    ``v`` (B, m, k), already zero beyond each layer's new rank ``ranks[i]`` (the batched
    counterpart of :meth:`GeoLoRALayer.set_factors`). ``k`` must be at least every layer's current
    rank, so that all of the old active part is overwritten."""
    k = u.shape[-1]
    if any(layer.current_rank > k for layer in layers) or not all(1 <= r <= k for r in ranks):
        raise ValueError(
            f"Stacked factors of width {k} must cover every layer's current rank "
            f"({max(layer.current_rank for layer in layers)}) and the new ranks {list(ranks)} "
            f"(1 ≤ r ≤ {k}): pass wider factors."
        )
    factors = [[getattr(layer, name) for layer in layers] for name in ("U", "S", "V")]
    write_leading(factors, [u, s, v])
    for layer, r in zip(layers, ranks):
        layer.rank.fill_(r)
        layer._rank = r
