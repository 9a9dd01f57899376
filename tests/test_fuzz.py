"""Property-based fuzzing of the integrator's invariants (spec §2) over shapes, ranks, ``r_max``,
``τ``, learning rates and dtypes.

One geometric step from ``(U, S, V)`` with plain-SGD directions ``D_K = G V``, ``D_L = Gᵀ U``,
``D_S = Uᵀ G V`` of a random dense gradient ``G`` must give:

* orthonormal augmented bases ``Û = [U | Ũ]``, ``V̂ = [V | Ṽ]`` that contain ``U`` and ``V``;
* ``Û Ŝ V̂ᵀ = U S₁ Vᵀ − λ Πᵤ D_K Vᵀ − λ U (Πᵥ D_L)ᵀ``, ``Πᵤ = Ũ Ũᵀ``, ``Πᵥ = Ṽ Ṽᵀ`` (the kept new
  directions; exact in general, also under the ``r_max`` cap);
* without the cap, the tangent identity ``Û Ŝ V̂ᵀ = U S Vᵀ − λ P(G)``;
* after the SVD truncation: ``r_min ≤ r₁ ≤ r_max``, orthonormal new factors, finite
  non-negative sorted singular values, and a dropped tail of norm ``≤ τ‖σ‖`` unless a rank
  bound forced the rank.

A second property drives a real GeoLoRA layer through :class:`GeoLoRAOptimizer` with both base
rules and checks the same invariants on the stored parameters (inactive part zero, ``S``
diagonal).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model
from geolora.layers import random_orthonormal
from geolora.optim import integrator, rank_rules

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None)
DTYPES = st.sampled_from([torch.float32, torch.float64])


def _tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 2e-5


def _orthonormality_error(basis: torch.Tensor) -> float:
    eye = torch.eye(basis.shape[-1], dtype=basis.dtype)
    return float((basis.T @ basis - eye).abs().max())


@st.composite
def problems(draw):
    n, m = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    r = draw(st.integers(1, min(n, m)))
    return dict(
        n=n,
        m=m,
        r=r,
        r_max=draw(st.integers(r, min(n, m))),
        r_min=draw(st.integers(1, r)),
        tau=draw(st.floats(0.0, 0.9)),
        lr=draw(st.floats(1e-4, 2.0)),
        s_scale=draw(st.sampled_from([0.0, 1e-3, 1.0, 100.0])),
        dtype=draw(DTYPES),
        seed=draw(st.integers(0, 2**16)),
    )


@FUZZ
@given(problems())
def test_step_invariants(p):
    n, m, r, dtype, lr = p["n"], p["m"], p["r"], p["dtype"], p["lr"]
    gen = torch.Generator().manual_seed(p["seed"])
    u = random_orthonormal(n, r, gen).to(dtype)
    v = random_orthonormal(m, r, gen).to(dtype)
    s = torch.diag(torch.rand(r, generator=gen, dtype=dtype) * p["s_scale"])
    g = torch.randn(n, m, generator=gen, dtype=dtype)
    d_k, d_l, s1 = g @ v, g.T @ u, s - lr * (u.T @ g @ v)
    u_aug = integrator.augment_basis(u, d_k)
    v_aug = integrator.augment_basis(v, d_l)
    s_hat = integrator.augmented_coefficients(s1, u_aug, v_aug, lr)
    tol = _tol(dtype)
    size = 1.0 + float(s1.abs().max()) + lr * float(g.abs().max()) * (n + m)

    # augmented bases: orthonormal, contain the old bases, r new columns (never capped at r_max)
    for aug, old, dim in ((u_aug, u, n), (v_aug, v, m)):
        k = aug.basis.shape[1] - r
        assert k == min(r, dim - r)
        assert _orthonormality_error(aug.basis) <= 10 * tol
        assert float((aug.basis @ (aug.basis.T @ old) - old).abs().max()) <= 10 * tol
    assert torch.isfinite(s_hat).all()

    # the tangent-space identity U S Vᵀ − λ P(G), at every rank up to and at r_max
    lhs = u_aug.basis @ s_hat @ v_aug.basis.T
    pu, pv = u @ u.T, v @ v.T
    tangent = u @ s @ v.T - lr * (pu @ g + g @ pv - pu @ g @ pv)
    assert float((lhs - tangent).abs().max()) <= 10 * tol * size

    # truncation
    big_p, sigma, qh = torch.linalg.svd(s_hat, full_matrices=False)
    r1 = int(rank_rules.local_ranks(sigma, p["tau"], p["r_min"], p["r_max"]))
    assert p["r_min"] <= r1 <= p["r_max"] and r1 <= sigma.numel()
    u1, sig1, v1 = u_aug.basis @ big_p[:, :r1], sigma[:r1], v_aug.basis @ qh[:r1].T
    assert torch.isfinite(sig1).all() and (sig1 >= 0).all()
    assert (sig1[:-1] >= sig1[1:]).all()
    assert _orthonormality_error(u1) <= 10 * tol and _orthonormality_error(v1) <= 10 * tol
    tail = float(sigma[r1:].norm())
    forced = r1 == p["r_max"] or r1 == p["r_min"]
    if not forced:
        assert tail <= p["tau"] * float(sigma.norm()) * (1 + tol) + tol


@st.composite
def layer_problems(draw):
    n, m = draw(st.integers(2, 20)), draw(st.integers(2, 20))
    r = draw(st.integers(1, min(n, m)))
    return dict(
        n=n,
        m=m,
        r=r,
        r_max=draw(st.integers(r, 24)),
        tau=draw(st.floats(0.0, 0.5)),
        lr=draw(st.floats(1e-4, 0.1)),
        base_rule=draw(
            st.sampled_from(["adam", "riemannian_adam_rows", "riemannian_adam_features", "sgd"])
        ),
        momentum=draw(st.sampled_from([0.0, 0.9])),
        dtype=draw(DTYPES),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(layer_problems())
def test_optimizer_keeps_layer_invariants(p):
    torch.manual_seed(p["seed"])
    n, m, dtype = p["n"], p["m"], p["dtype"]
    base = torch.nn.Sequential(torch.nn.Linear(m, n)).to(dtype)
    config = GeoLoRAConfig(target_modules=["0"], r=p["r"], r_max=p["r_max"], tau=p["tau"])
    model = get_geolora_model(base, config)
    layer = model[0]
    optimizer = GeoLoRAOptimizer(
        model, lr=p["lr"], base_rule=p["base_rule"], momentum=p["momentum"]
    )
    x = torch.randn(32, m, dtype=dtype)
    target = torch.randn(32, n, dtype=dtype)
    tol = _tol(dtype)
    for _ in range(4):
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
        r = layer.current_rank
        assert min(config.r_min, layer.r_max) <= r <= layer.r_max == min(p["r_max"], n, m)
        assert int(layer.rank) == r
        u, s, v = (t.detach() for t in layer.active_factors())
        assert all(torch.isfinite(t).all() for t in (layer.U, layer.S, layer.V))
        assert _orthonormality_error(u) <= 100 * tol and _orthonormality_error(v) <= 100 * tol
        assert torch.equal(s, torch.diag(torch.diagonal(s))) and (torch.diagonal(s) >= 0).all()
        assert not layer.U[:, r:].any() and not layer.V[:, r:].any()
        assert not layer.S[r:, :].any() and not layer.S[:, r:].any()
