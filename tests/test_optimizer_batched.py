"""The batched GeoLoRAOptimizer step against a plain per-adapter reference of the documented math.

The optimizer stacks the adapters of one shape and steps them together (ranks with ``2r ≤ min(n,
m)`` in one bucket, the narrower adapters zero-padded to the widest), computing the truncation and
the state transport with all columns of ``P`` and ``Q`` and zeroing each adapter's part beyond its
new rank. The reference here steps one adapter at a time, as written in the docstrings of
:mod:`geolora.optim.base_rules` and :mod:`geolora.optim.integrator`: base-rule directions with the
adapter's own step count, ``S₁ = (1 − λ·wd) S − λ D_S``, augmentation, SVD, the shrinkage ``σ ←
max(σ − μ σ_max(ΔŜ), 0)``, the local rank rule with its margin, ``U ← Û P₁``, and the transport
``M_K ← M_K C_vᵀ`` … with the second-moment fill (per-coordinate Adam), the invariant scalar
(Riemannian Adam) or the invariant scalar and row moments (its row-capped variant). Every step,
factors and full-size state (zero beyond the rank) must agree to float64 rounding, both when whole
tensors are copied (small adapters) and when views of their active part are.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import geolora.optim.buckets
import geolora.optim.stacking
from geolora import (
    GeoLoRAConfig,
    GeoLoRAOptimizer,
    geolora_layers,
    get_geolora_model,
)
from geolora.optim import integrator, rank_rules
from geolora.optim.base_rules import REFERENCE_RANK
from geolora.optim.stacking import set_stacked_factors

LR, WD, TAU, R_MAX, MOMENTUM, MARGIN, SHRINK = 0.05, 0.1, 0.2, 8, 0.9, 0.1, 0.05
BETAS, EPS = (0.9, 0.999), 1e-8


def _model(freeze: bool) -> nn.Module:
    """Four 12 → 12 adapters (one bucket while their ranks agree) and one 12 → 10 adapter."""
    torch.manual_seed(0)
    layers = [nn.Linear(12, 12) for _ in range(4)] + [nn.Linear(12, 10)]
    net = nn.Sequential(*layers).double()
    config = GeoLoRAConfig(
        target_modules=r"\d",
        r=3,
        r_max=R_MAX,
        tau=TAU,
        rank_margin=MARGIN,
        shrinkage=SHRINK,
        freeze_ranks_after=0 if freeze else None,
    )
    return get_geolora_model(net, config)


def _reference(layer, state: dict, rule: str, freeze: bool, correction: bool) -> tuple[dict, dict]:
    """One step of one adapter from its factors, gradients and state (not modified), with Adam's
    first-moment bias correction or without. Returns the new full-size factors
    ``{"U", "S", "V"}`` and state."""
    r = layer.current_rank
    act = {"K": lambda t: t[:, :r], "L": lambda t: t[:, :r], "S": lambda t: t[:r, :r]}
    grads = {"K": layer.U.grad, "L": layer.V.grad, "S": layer.S.grad}
    t = float(state["step"]) + 1
    c1 = 1 - BETAS[0] ** t if correction else 1.0
    first, second, d = {}, {}, {}
    grads = {key: act[key](g) for key, g in grads.items()}
    # the moments' columns: the active rank (a mean), or features' fixed reference rank
    columns = REFERENCE_RANK if rule == "riemannian_adam_features" else r
    total_sq = sum(g.square().sum() for g in grads.values())
    mean_sq = total_sq / (sum(g.shape[0] for g in grads.values()) * columns)
    for key, g in grads.items():
        if rule == "sgd":
            first[key] = MOMENTUM * act[key](state[key]) + g
            d[key] = first[key]
        elif rule.startswith("riemannian_adam"):
            first[key] = BETAS[0] * act[key](state[key]) + (1 - BETAS[0]) * g
            q = BETAS[1] * state["sq"] + (1 - BETAS[1]) * mean_sq
            denominator = q
            if rule in ("riemannian_adam_rows", "riemannian_adam_features"):
                # one moment per ambient row, one for the core
                row_sq = g.square().sum(1, keepdim=True) / columns
                fresh = row_sq if key != "S" else g.square().mean()
                old_sq = state[key + "_rsq"] if key != "S" else state["S_rsq"][0, 0]
                second[key] = BETAS[1] * old_sq + (1 - BETAS[1]) * fresh
                if rule == "riemannian_adam_rows":
                    denominator = torch.maximum(second[key], q)
                elif key != "S":  # features: the rows by their own moment, the core by q
                    denominator = second[key]
            m_hat = first[key] / c1
            d[key] = m_hat / ((denominator / (1 - BETAS[1] ** t)).sqrt() + EPS)
        else:
            first[key] = BETAS[0] * act[key](state[key]) + (1 - BETAS[0]) * g
            second[key] = BETAS[1] * act[key](state[key + "_sq"]) + (1 - BETAS[1]) * g * g
            m_hat, q_hat = first[key] / c1, second[key] / (1 - BETAS[1] ** t)
            d[key] = m_hat / (q_hat.sqrt() + EPS)
    u, s, v = (f.detach() for f in layer.active_factors())
    u_aug = integrator.augment_basis(u, d["K"])
    v_aug = integrator.augment_basis(v, d["L"])
    s1 = (1 - LR * WD) * s - LR * d["S"]
    p, sigma, qh = torch.linalg.svd(integrator.augmented_coefficients(s1, u_aug, v_aug, LR))
    available = int((sigma > 0).sum())
    step_part = integrator.augmented_coefficients(-LR * d["S"], u_aug, v_aug, LR)
    sigma = (sigma - SHRINK * torch.linalg.svdvals(step_part)[0]).clamp(min=0)
    r1 = r if freeze else int(rank_rules.local_ranks(sigma, TAU, 1, R_MAX, MARGIN, r, available))
    p1, q1, sig1 = p[:, :r1], qh[:r1, :].T, sigma[:r1]
    u1, v1 = u_aug.basis @ p1, v_aug.basis @ q1
    c_u = integrator.coordinate_change(u_aug.r11, p1)
    c_v = integrator.coordinate_change(v_aug.r11, q1)
    new = {
        "K": first["K"] @ c_v.T,
        "L": first["L"] @ c_u.T,
        "S": c_u @ first["S"] @ c_v.T,
    }
    if rule.startswith("riemannian_adam"):
        new["sq"] = q
    if rule in ("riemannian_adam_rows", "riemannian_adam_features"):
        new["K_rsq"] = second["K"]  # one column: the row's value
        new["L_rsq"] = second["L"]
        new["S_rsq"] = second["S"].expand(r1, 1)
    if rule == "adam":
        cu2, cv2 = c_u.square(), c_v.square()
        miss_u, miss_v = (1 - cu2.sum(1)).clamp(min=0), (1 - cv2.sum(1)).clamp(min=0)
        q_k, q_l, q_s = second["K"], second["L"], second["S"]
        new["K_sq"] = q_k @ cv2.T + q_k.mean(1, keepdim=True) * miss_v
        new["L_sq"] = q_l @ cu2.T + q_l.mean(1, keepdim=True) * miss_u
        missing_s = (1 - torch.outer(1 - miss_u, 1 - miss_v)).clamp(min=0)
        new["S_sq"] = cu2 @ q_s @ cv2.T + q_s.mean() * missing_s

    def full(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like)
        if out.dim() == 0:
            return out + x
        out[: x.shape[0], : x.shape[1]] = x
        return out

    factors = {"U": full(u1, layer.U), "S": full(torch.diag(sig1), layer.S), "V": full(v1, layer.V)}
    return factors, {key: full(value, state[key]) for key, value in new.items()}


@pytest.mark.parametrize(
    "rule", ["riemannian_adam", "riemannian_adam_rows", "riemannian_adam_features", "adam", "sgd"]
)
@pytest.mark.parametrize("freeze", [False, True], ids=["local_tau", "frozen_ranks"])
@pytest.mark.parametrize("copy", ["whole", "views"])
@pytest.mark.parametrize("grouping", ["padded", "by_rank"])
@pytest.mark.parametrize("correction", [False, True], ids=["raw_first", "corrected_first"])
def test_batched_step_matches_per_adapter_reference(
    rule, freeze, copy, grouping, correction, monkeypatch
):
    if copy == "views":  # large adapters: read and write views of the active part per tensor
        monkeypatch.setattr(geolora.optim.stacking, "WHOLE_COPY_BYTES", 0)
    if grouping == "by_rank":  # batches free: one bucket per rank, nothing padded
        monkeypatch.setattr(geolora.optim.buckets, "BUCKET_OVERHEAD", 0.0)
    model = _model(freeze)
    momentum = MOMENTUM if rule == "sgd" else 0.0
    opt = GeoLoRAOptimizer(
        model,
        lr=LR,
        weight_decay=WD,
        base_rule=rule,
        momentum=momentum,
        first_moment_correction=correction,
    )
    layers = list(geolora_layers(model).values())
    # the patch must reach the module that decides, or "views" would test the whole copies
    assert geolora.optim.stacking.copy_whole(layers[0].U, 1, 1) == (copy == "whole")
    gen = torch.Generator().manual_seed(1)
    mixed_ranks_in_bucket = mixed_steps_in_bucket = padded_in_bucket = False
    for step in range(5):
        x = torch.randn(16, 12, generator=gen, dtype=torch.float64)
        model(x).sin().sum().backward()
        if step in (1, 2):  # layer 1 has no gradient: it keeps its factors and step count
            for factor in (layers[1].U, layers[1].S, layers[1].V):
                factor.grad = None
        stepped = [layer for layer in layers if layer.U.grad is not None]
        expected = {}
        for layer in stepped:
            state = opt.state[layer.U]
            if not state:
                state = {"step": torch.zeros(())}
                for key in ("K", "L", "S", "K_sq", "L_sq", "S_sq", "K_rsq", "L_rsq", "S_rsq"):
                    like = {"K": layer.U, "L": layer.V, "S": layer.S}[key[0]]
                    state[key] = torch.zeros_like(like[:, :1] if "rsq" in key else like)
                state["sq"] = torch.zeros((), dtype=torch.float64)
            expected[layer] = _reference(layer, state, rule, freeze, correction)
        old = {
            layer: (layer.current_rank, float(opt.state[layer.U].get("step", 0)))
            for layer in stepped
        }
        skipped = {layer: layer.U.detach().clone() for layer in layers if layer not in stepped}
        opt.step()
        opt.zero_grad()

        for layer, (factors, state) in expected.items():
            for name, value in factors.items():
                torch.testing.assert_close(getattr(layer, name).detach(), value, rtol=0, atol=1e-10)
            assert int(layer.rank) == layer.current_rank == opt.state[layer.U]["rank"]
            assert layer.current_rank >= int((factors["S"].diagonal() != 0).sum())
            for key, value in state.items():
                torch.testing.assert_close(opt.state[layer.U][key], value, rtol=1e-9, atol=1e-12)
        for layer, u in skipped.items():
            assert torch.equal(layer.U.detach(), u)

        square = [layer for layer in stepped if layer.out_features == 12]
        for a in square:
            for b in square:
                if old[a][0] == old[b][0] and a.current_rank != b.current_rank:
                    mixed_ranks_in_bucket = True
                if old[a][0] == old[b][0] and old[a][1] != old[b][1]:
                    mixed_steps_in_bucket = True
                if old[a][0] < old[b][0] <= 12 // 2:  # a zero-padded to b's width, or not
                    padded_in_bucket = True
    # the cases the batching has to get right did occur
    assert mixed_steps_in_bucket if freeze else mixed_ranks_in_bucket and padded_in_bucket
    steps = {float(opt.state[layer.U]["step"]) for layer in layers}
    assert steps == {3.0, 5.0}


def test_stacked_factors_must_cover_the_old_rank():
    """Writing only the leading part relies on overwriting the whole old active part."""
    layers = list(geolora_layers(_model(freeze=False)).values())[:2]  # rank 3
    before = layers[0].U.detach().clone()
    u, s = torch.zeros(2, 12, 2, dtype=torch.float64), torch.zeros(2, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="current rank \\(3\\).*pass wider factors"):
        set_stacked_factors(layers, u, s, u, [1, 2])
    assert torch.equal(layers[0].U.detach(), before) and layers[0].current_rank == 3


def test_buckets_pad_cheap_adapters_together_and_split_costly_widths(monkeypatch):
    from geolora.optim.buckets import group_by_width, plan_buckets

    assert group_by_width([1, 3, 6, 2], rows=24) == [[0, 3, 1, 2]]  # tiny QRs: one padded bucket
    ranks = [4] * 60 + [18]  # one wide gate_proj of SmolLM2 would make sixty narrow ones pay 20x
    groups = group_by_width(ranks, rows=1536 + 576)
    assert sorted(map(len, groups)) == [1, 60] and groups[-1] == [60]
    assert group_by_width([5, 2, 5, 2], rows=24, overhead=0.0) == [[1, 3], [0, 2]]
    layers = list(geolora_layers(_model(freeze=False)).values())
    for layer, r in zip(layers, [1, 3, 3, 2, 2]):
        eye = torch.eye(max(layer.out_features, layer.in_features), r, dtype=torch.float64)
        layer.set_factors(eye[: layer.out_features], torch.ones(r), eye[: layer.in_features])
        for factor in (layer.U, layer.S, layer.V):
            factor.grad = torch.zeros_like(factor)
    layers[1].U.grad = None  # no gradient: not stepped
    assert plan_buckets(layers) == [[layers[0], layers[3], layers[2]], [layers[4]]]
    monkeypatch.setattr(geolora.optim.buckets, "BUCKET_OVERHEAD", 0.0)
    by_rank = plan_buckets(layers)
    assert by_rank == [[layers[0]], [layers[3]], [layers[2]], [layers[4]]]


@settings(max_examples=60, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 32), min_size=1, max_size=7),
    rows=st.sampled_from([24, 768, 2112]),
)
def test_bucket_grouping_is_the_cheapest_contiguous_partition(ranks, rows):
    """Against every partition of the sorted ranks into contiguous runs (2^(k-1) of them)."""
    from geolora.optim.buckets import BUCKET_OVERHEAD, group_by_width

    def cost(groups):
        return sum(
            BUCKET_OVERHEAD + len(g) * rows * (2 * max(ranks[i] for i in g)) ** 2 for g in groups
        )

    groups = group_by_width(ranks, rows)
    assert sorted(i for g in groups for i in g) == list(range(len(ranks)))
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    best = min(
        cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
        for k in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), k)
    )
    assert cost(groups) == pytest.approx(best, rel=1e-12)
