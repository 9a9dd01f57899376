"""Rank selection rules (spec §2 step 4 and §3)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geolora import GeoLoRAConfig
from geolora.optim.rank_rules import (
    RANK_RULES,
    LayerGroup,
    budget_ranks,
    global_tau_ranks,
    local_ranks,
    rank_rule_for,
)


def _reference_local(sigma, tau):
    """Smallest j with ‖σ[j:]‖ ≤ τ‖σ‖, by brute force."""
    total = sigma.norm()
    for j in range(len(sigma) + 1):
        if sigma[j:].norm() <= tau * total:
            return j
    raise AssertionError


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 10)), min_size=1, max_size=20),
    tau=st.floats(0, 0.99),
)
def test_local_rank_matches_definition(values, tau):
    sigma = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    expected = max(1, min(_reference_local(sigma, tau), 16, len(values)))
    assert int(local_ranks(sigma, tau, r_min=1, r_max=16)) == expected


def test_local_rank_examples():
    sigma = torch.tensor([10.0, 1.0, 0.1, 0.01])
    assert int(local_ranks(sigma, 0.0, 1, 8)) == 4
    assert int(local_ranks(sigma, 0.05, 1, 8)) == 2  # ‖(0.1, 0.01)‖ ≤ 0.05·‖σ‖
    assert int(local_ranks(sigma, 0.5, 1, 8)) == 1
    assert int(local_ranks(sigma, 0.5, 3, 8)) == 3  # r_min
    assert int(local_ranks(sigma, 0.0, 1, 2)) == 2  # r_max
    assert int(local_ranks(torch.zeros(4), 0.1, 1, 8)) == 1  # nothing to keep: r_min
    batch = torch.stack([sigma, torch.tensor([1.0, 1.0, 1.0, 1.0])])
    assert local_ranks(batch, 0.05, 1, 8).tolist() == [2, 4]


def test_margin_may_keep_values_the_shrinkage_zeroed():
    """After the shrinkage, the margin triplets may carry σ = 0 (they get the first-order
    gradient next step); ``available`` (the non-zero count before it) bounds them."""
    shrunk = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0], [4.0, 3.0, 0.0, 0.0, 0.0]])
    assert int(local_ranks(shrunk[0], 0.0, 1, 8, margin=0.5)) == 2  # no zero without available
    assert local_ranks(shrunk, 0.0, 1, 8, 0.5, available=torch.tensor([5, 2])).tolist() == [3, 2]
    assert global_tau_ranks(list(shrunk), 0.0, [1, 1], [8, 8], 0.5, [2, 2], [5, 2]) == [3, 2]
    zero = torch.zeros(4)  # nothing to decide from: the current rank stays
    assert int(local_ranks(zero, 0.1, 1, 8, 0.5, current=3, available=torch.tensor(0))) == 3


def test_global_tau_drops_smallest_values_network_wide():
    big = torch.tensor([10.0, 9.0, 8.0])
    small = torch.tensor([0.5, 0.4, 0.3])
    # locally each layer keeps all three at τ = 0.1; globally the small layer is cut to r_min
    assert int(local_ranks(small, 0.1, 1, 8)) == 3
    assert global_tau_ranks([big, small], 0.1, [1, 1], [8, 8]) == [3, 1]
    assert global_tau_ranks([big, small], 0.0, [1, 1], [8, 8]) == [3, 3]


def test_budget_keeps_largest_values():
    a = torch.tensor([5.0, 4.0, 1.0, 0.5])
    b = torch.tensor([3.0, 2.0, 0.1, 0.0])
    assert budget_ranks([a, b], 4, [1, 1], [1, 1], [8, 8]) == [2, 2]
    assert budget_ranks([a, b], 5, [1, 1], [1, 1], [8, 8]) == [3, 2]
    assert budget_ranks([a, b], 100, [1, 1], [1, 1], [8, 8]) == [4, 3]  # zeros are never bought
    assert budget_ranks([a, b], 1, [1, 1], [1, 1], [8, 8]) == [1, 1]  # r_min always kept
    assert budget_ranks([a, b], 100, [1, 1], [1, 1], [2, 8]) == [2, 3]  # r_max


def test_parameter_budget_counts_layer_costs():
    a = torch.tensor([5.0, 4.0, 3.0])
    b = torch.tensor([4.5, 3.5, 2.5])
    # costs 10 and 1: after the floors (11), 9 are left; the next largest value, a's 4.0,
    # costs 10 and does not fit, and smaller values are never bought past a larger one
    assert budget_ranks([a, b], 20, [10, 1], [1, 1], [8, 8]) == [1, 1]
    assert budget_ranks([a, b], 21, [10, 1], [1, 1], [8, 8]) == [2, 1]
    assert budget_ranks([a, b], 22, [10, 1], [1, 1], [8, 8]) == [2, 2]
    total = sum(r * c for r, c in zip(budget_ranks([a, b], 35, [10, 1], [1, 1], [8, 8]), [10, 1]))
    assert total <= 35


def _config(**kwargs) -> GeoLoRAConfig:
    return GeoLoRAConfig(target_modules=["query"], **kwargs)


def _groups():
    """Two buckets of layers whose singular values interleave."""
    first = LayerGroup(
        sigma=torch.tensor([[5.0, 1.0, 0.2, 0.0], [4.0, 3.0, 0.5, 0.1]], dtype=torch.float64),
        available=torch.tensor([3, 4]),
        current=[2, 2],
        costs=[10, 10],
        r_min=1,
        r_max=4,
    )
    second = LayerGroup(
        sigma=torch.tensor([[2.0, 1.5, 0.0, 0.0]], dtype=torch.float64),
        available=torch.tensor([2]),
        current=[3],
        costs=[30],
        r_min=1,
        r_max=3,
    )
    return [first, second]


def test_rank_rules_over_groups_match_the_pure_functions():
    groups = _groups()
    sigmas = [s for g in groups for s in g.sigma]
    local = RANK_RULES["local"].choose(groups, _config(rank_margin=0.5), 0.1)
    assert local == [
        local_ranks(g.sigma, 0.1, g.r_min, g.r_max, 0.5, g.current, g.available).tolist()
        for g in groups
    ]
    config = _config(truncation="global", rank_margin=0.0)
    flat = global_tau_ranks(sigmas, 0.1, [1, 1, 1], [4, 4, 3], 0.0, [2, 2, 3], [3, 4, 2])
    assert RANK_RULES["global"].choose(groups, config, 0.1) == [flat[:2], flat[2:]]
    budget = RANK_RULES["budget"].choose(groups, _config(budget=90), 0.1)
    # the floors (5, 4, 2) cost 10 + 10 + 30; of the 40 left, 3 costs 10 and 1.5 costs 30
    assert budget == [[1, 2], [2]]
    flat = budget_ranks(sigmas, 90, [10, 10, 30], [1, 1, 1], [4, 4, 3])
    assert budget == [flat[:2], flat[2:]]


def test_the_config_picks_its_rank_rule():
    assert [name for name, rule in RANK_RULES.items() if rule.needs_costs] == ["budget"]
    assert rank_rule_for(_config()) is RANK_RULES["local"]
    assert rank_rule_for(_config(truncation="global")) is RANK_RULES["global"]
    assert rank_rule_for(_config(truncation="global", budget=64)) is RANK_RULES["budget"]
