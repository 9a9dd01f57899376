"""Rank selection after the augmented SVD (spec §2 step 4 and §3), as pure functions.

Every rule sees the singular values ``σ`` of each layer's augmented coefficient matrix, sorted
descending, and returns how many to keep.

* Local (the paper's default): per layer, the smallest ``r₁`` with
  ``‖(σ_{r₁+1}, …)‖₂ ≤ τ‖σ‖₂``, clipped to ``[r_min, r_max]``.
* Global τ: the same criterion over the singular values of all layers together.
* Budget: keep the largest singular values network-wide while their total cost fits the budget,
  each layer keeping at least ``r_min`` (a cost of 1 per value gives a total-rank budget; a cost
  of ``n + m + 1`` gives a parameter budget).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["budget_ranks", "global_tau_ranks", "local_ranks"]


def _tail_norms(sigma: Tensor) -> Tensor:
    """``tail[j] = ‖σ[j:]‖₂`` for a descending ``σ`` along the last dimension."""
    return sigma.square().flip(-1).cumsum(-1).flip(-1).sqrt()


def local_ranks(sigma: Tensor, tau: float, r_min: int, r_max: int) -> Tensor:
    """Ranks (…,) by the relative tolerance ``τ`` for singular values ``sigma`` (…, k)."""
    threshold = tau * sigma.norm(dim=-1, keepdim=True)
    keep = (_tail_norms(sigma) > threshold).sum(-1)
    return keep.clamp(min=r_min, max=min(r_max, sigma.shape[-1]))


def _clip(
    keep: Sequence[int], sigmas: Sequence[Tensor], r_min: Sequence[int], r_max: Sequence[int]
):
    return [max(lo, min(int(k), hi, s.numel())) for k, s, lo, hi in zip(keep, sigmas, r_min, r_max)]


def global_tau_ranks(
    sigmas: Sequence[Tensor], tau: float, r_min: Sequence[int], r_max: Sequence[int]
) -> list[int]:
    """One relative tolerance over all layers: drop the smallest singular values network-wide
    whose joint norm stays below ``τ ‖σ_all‖₂``."""
    flat = torch.cat([s.reshape(-1) for s in sigmas])
    ordered = flat.sort(descending=True).values
    n_keep = int((_tail_norms(ordered) > tau * ordered.norm()).sum())
    if n_keep == 0:
        return _clip([0] * len(sigmas), sigmas, r_min, r_max)
    cutoff = ordered[n_keep - 1]
    return _clip([int((s >= cutoff).sum()) for s in sigmas], sigmas, r_min, r_max)


def budget_ranks(
    sigmas: Sequence[Tensor],
    budget: int,
    costs: Sequence[int],
    r_min: Sequence[int],
    r_max: Sequence[int],
) -> list[int]:
    """Keep the largest non-zero singular values network-wide while their total cost
    (``costs[i]`` per value of layer ``i``) fits ``budget``; every layer keeps ``r_min`` first."""
    floor = [min(lo, s.numel()) for s, lo in zip(sigmas, r_min)]
    remaining = budget - sum(f * c for f, c in zip(floor, costs))
    values, owners, prices = [], [], []
    for i, (s, f, hi) in enumerate(zip(sigmas, floor, r_max)):
        extra = s.reshape(-1)[f : min(hi, s.numel())]
        extra = extra[extra > 0]
        values.append(extra)
        owners.append(torch.full((extra.numel(),), i, dtype=torch.long))
        prices.append(torch.full((extra.numel(),), costs[i], dtype=torch.long))
    values_t, owners_t, prices_t = torch.cat(values), torch.cat(owners), torch.cat(prices)
    order = values_t.argsort(descending=True, stable=True)
    affordable = prices_t[order].cumsum(0) <= remaining
    extra_counts = torch.bincount(owners_t[order][affordable], minlength=len(sigmas))
    return [f + int(e) for f, e in zip(floor, extra_counts)]
