"""Guarded use of torch's private multi-tensor ops (``torch._foreach_*``).

They batch many small tensor ops into one call, which matters for the optimizer's buckets, but
they are private: a torch release may rename or drop them. Each helper here uses the fused op
where the running torch has it and falls back to the plain per-tensor loop (same result, one
Python call per tensor) where it does not, so the package keeps working on every torch it allows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["foreach_add_", "foreach_copy_", "foreach_norm"]


def _fused(name: str):
    return getattr(torch, f"_foreach_{name}", None)


def foreach_copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` for every ``i``."""
    fused = _fused("copy_")
    if fused is not None:
        fused(list(targets), list(sources))
        return
    for t, s in zip(targets, sources, strict=True):
        t.copy_(s)


def foreach_add_(tensors: Sequence[Tensor], value: float) -> None:
    """``tensors[i].add_(value)`` for every ``i``."""
    fused = _fused("add_")
    if fused is not None:
        fused(list(tensors), value)
        return
    for t in tensors:
        t.add_(value)


def foreach_norm(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``[‖tensors[i]‖₂]``: the 2-norm of each tensor over all of its entries (0-d tensors)."""
    fused = _fused("norm")
    if fused is not None:
        return list(fused(list(tensors)))
    return [torch.linalg.vector_norm(t) for t in tensors]
