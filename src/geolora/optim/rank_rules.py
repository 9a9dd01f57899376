"""Rank selection after the augmented SVD (spec §2 step 4 and §3): pure functions over the
singular values, and one small class per rule over all layers, registered in :data:`RANK_RULES`
(:func:`rank_rule_for` picks the one a config asks for).

Every rule sees the singular values ``σ`` of each layer's augmented coefficient matrix, sorted
descending, and returns how many to keep (the leading ones), clipped to ``[r_min, r_max]``.

* Local (the default): per layer, ``r_τ`` = the smallest ``j`` with
  ``‖(σ_{j+1}, …)‖₂ ≤ τ‖σ‖₂`` (the paper's relative tolerance), plus a growth margin of
  ``⌈ρ·r_τ⌉`` further triplets (``ρ`` = ``GeoLoRAConfig.rank_margin``). Why the margin: on the
  manifold of rank-``r`` matrices a direction that is not yet in the bases enters ``Ŝ`` only at
  second order. With ``S`` diagonal and large, ``Ŝ = [[S₁, a], [b, 0]]`` (``a``, ``b`` of order
  ``λ‖G‖``) has its ``r`` large singular values near ``S₁``'s and the others near those of the
  Schur complement ``b S₁⁻¹ a``, of order ``λ²‖G‖²/σ``; the first-order effect of ``a``, ``b`` is
  to rotate the fitted directions. So once the leading directions are fitted, a new direction
  must beat ``τ‖σ‖`` with a second-order singular value and the rank stalls, for every ``λ`` and
  base rule. A kept triplet, in contrast, gets the first-order coefficient gradient ``uᵀ G v`` at
  the next step: the margin triplets grow step after step when the gradient keeps feeding them,
  pass the relative test, and the margin moves on to the next ones; those the gradient does not
  feed stay tiny and are replaced. The cost is ``⌈ρ r_τ⌉`` extra columns per layer.
* Global τ: the relative test over the singular values of all layers together, plus the same
  per-layer margin.
* Budget: keep the largest singular values network-wide while their total cost fits the budget,
  each layer keeping at least ``r_min`` (a cost of 1 per value gives a total-rank budget; a cost
  of ``n + m + 1`` gives a parameter budget). No margin: the budget is exact.

The rules see the singular values after the shrinkage (:func:`geolora.optim.integrator.
shrink_singular_values`), which sets those of directions the gradient does not keep feeding to
zero. Margin triplets may carry such a zero (their bases stay, so they get the first-order
gradient next step); ``available``, the number of non-zero values before the shrinkage, bounds
them. A step that is zero altogether (``σ = 0``: no gradient and no coefficients yet) keeps the
layer's current rank: there is nothing to decide from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..config import GeoLoRAConfig

__all__ = [
    "RANK_RULES",
    "TRUNCATION_MODES",
    "LayerGroup",
    "RankRule",
    "budget_ranks",
    "global_tau_ranks",
    "local_ranks",
    "rank_rule_for",
    "with_margin",
]


def _tail_norms(sigma: Tensor) -> Tensor:
    """``tail[j] = ‖σ[j:]‖₂`` for a descending ``σ`` along the last dimension."""
    return sigma.square().flip(-1).cumsum(-1).flip(-1).sqrt()


def with_margin(
    r_tau: Tensor,
    sigma: Tensor,
    margin: float,
    r_min: int,
    r_max: int,
    current: Tensor,
    available: Tensor | None = None,
) -> Tensor:
    """``clip(r_τ + ⌈ρ r_τ⌉, r_min, r_max)`` with at most ``available`` (…,) triplets (default:
    the non-zero ``σ`` (…, k)), or ``current`` where all of a layer's ``σ`` vanish."""
    nonzero = (sigma > 0).sum(-1)
    available = nonzero if available is None else torch.as_tensor(available)
    keep = torch.minimum(r_tau + torch.ceil(margin * r_tau).long(), available)
    keep = torch.where(nonzero == 0, current, keep)
    return keep.clamp(min=r_min, max=min(r_max, sigma.shape[-1]))


def local_ranks(
    sigma: Tensor,
    tau: float,
    r_min: int,
    r_max: int,
    margin: float = 0.0,
    current=None,
    available=None,
) -> Tensor:
    """Ranks (…,) by the relative tolerance ``τ`` plus the growth margin for ``sigma`` (…, k);
    ``current`` (…,) ranks are kept where ``σ = 0`` (default ``r_min``); ``available`` as in
    :func:`with_margin`."""
    r_tau = (_tail_norms(sigma) > tau * sigma.norm(dim=-1, keepdim=True)).sum(-1)
    if current is None:
        current = torch.full_like(r_tau, r_min)
    return with_margin(r_tau, sigma, margin, r_min, r_max, torch.as_tensor(current), available)


def global_tau_ranks(
    sigmas: Sequence[Tensor],
    tau: float,
    r_min: Sequence[int],
    r_max: Sequence[int],
    margin: float = 0.0,
    current: Sequence[int] | None = None,
    available: Sequence[int] | None = None,
) -> list[int]:
    """One relative tolerance over all layers: drop the smallest singular values network-wide
    whose joint norm stays below ``τ ‖σ_all‖₂``; then each layer's margin."""
    flat = torch.cat([s.reshape(-1) for s in sigmas])
    ordered = flat.sort(descending=True).values
    n_keep = int((_tail_norms(ordered) > tau * ordered.norm()).sum())
    cutoff = ordered[n_keep - 1] if n_keep else ordered.new_tensor(float("inf"))
    current = list(r_min) if current is None else current
    available = [None] * len(sigmas) if available is None else available
    return [
        int(with_margin((s >= cutoff).sum(), s, margin, lo, hi, torch.tensor(c), a))
        for s, lo, hi, c, a in zip(sigmas, r_min, r_max, current, available)
    ]


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


@dataclass(frozen=True)
class LayerGroup:
    """What a rule sees of the layers stepped as one batch (one bucket), on the host."""

    sigma: Tensor
    """(B, k) singular values of each layer's ``Ŝ`` after the shrinkage, descending."""
    available: Tensor
    """(B,) non-zero singular values of each layer's ``Ŝ`` before the shrinkage."""
    current: list[int]
    """Each layer's rank before the step."""
    costs: list[int]
    """What one kept singular value costs in each layer (1, or ``n + m + 1`` parameters); empty
    for rules that do not read it (:attr:`RankRule.needs_costs`)."""
    r_min: int
    r_max: int


class RankRule:
    """Decides every layer's new rank from the singular values of all layers."""

    needs_costs = False
    """Whether :meth:`choose` reads :attr:`LayerGroup.costs` (the step skips them otherwise)."""

    def choose(
        self, groups: Sequence[LayerGroup], config: GeoLoRAConfig, tau: float
    ) -> list[list[int]]:
        """The new rank of every layer of every group (``tau``: the tolerance of this step)."""
        raise NotImplementedError


class LocalTau(RankRule):
    """:func:`local_ranks` per layer, with the config's growth margin."""

    def choose(self, groups, config, tau):
        return [
            local_ranks(
                g.sigma, tau, g.r_min, g.r_max, config.rank_margin, g.current, g.available
            ).tolist()
            for g in groups
        ]


class GlobalTau(RankRule):
    """:func:`global_tau_ranks` over all layers, then each layer's margin."""

    def choose(self, groups, config, tau):
        flat = global_tau_ranks(
            [s for g in groups for s in g.sigma],
            tau,
            [g.r_min for g in groups for _ in g.current],
            [g.r_max for g in groups for _ in g.current],
            config.rank_margin,
            [c for g in groups for c in g.current],
            [int(a) for g in groups for a in g.available],
        )
        return _regroup(flat, groups)


class Budget(RankRule):
    """:func:`budget_ranks` with the config's exact budget (``tau`` is not used)."""

    needs_costs = True

    def choose(self, groups, config, tau):
        flat = budget_ranks(
            [s for g in groups for s in g.sigma],
            config.budget,
            [c for g in groups for c in g.costs],
            [g.r_min for g in groups for _ in g.current],
            [g.r_max for g in groups for _ in g.current],
        )
        return _regroup(flat, groups)


def _regroup(flat: Sequence[int], groups: Sequence[LayerGroup]) -> list[list[int]]:
    it = iter(flat)
    return [[next(it) for _ in g.current] for g in groups]


RANK_RULES: dict[str, RankRule] = {"local": LocalTau(), "global": GlobalTau(), "budget": Budget()}
"""The registered rules by name."""
TRUNCATION_MODES = tuple(name for name in RANK_RULES if name != "budget")
"""The rules a config's ``truncation`` may name; the budget rule is picked by ``budget``."""


def rank_rule_for(config: GeoLoRAConfig) -> RankRule:
    """The budget rule where the config sets a budget, else its ``truncation`` mode's."""
    return RANK_RULES["budget" if config.budget is not None else config.truncation]
