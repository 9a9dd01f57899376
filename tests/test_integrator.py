"""The integrator's pure functions against a dense float64 reference (spec §2)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geolora.layers import random_orthonormal
from geolora.optim import integrator


def _tangent_projection(u, v, g):
    """P(G) = UUᵀG + GVVᵀ − UUᵀGVVᵀ."""
    pu, pv = u @ u.T, v @ v.T
    return pu @ g + g @ pv - pu @ g @ pv


def _sgd_augmented(u, s, v, g, lr):
    """One plain-SGD step from the dense gradient G: returns (Û, Ŝ, V̂)."""
    d_k, d_l, d_s = g @ v, g.T @ u, u.T @ g @ v
    u_aug = integrator.augment_basis(u, d_k)
    v_aug = integrator.augment_basis(v, d_l)
    s_hat = integrator.augmented_coefficients(s - lr * d_s, u_aug, v_aug, lr)
    return u_aug, s_hat, v_aug


@pytest.mark.parametrize("n,m,r", [(30, 20, 4), (12, 40, 3), (9, 7, 5), (16, 16, 8)])
def test_tangent_space_identity_float64(n, m, r):
    """[U|Ũ] Ŝ [V|Ṽ]ᵀ = U S Vᵀ − λ P(G), to rounding error."""
    g_ = torch.Generator().manual_seed(n * m + r)
    u, v = random_orthonormal(n, r, g_), random_orthonormal(m, r, g_)
    s = torch.diag(torch.rand(r, generator=g_, dtype=torch.float64) + 0.1)
    g = torch.randn(n, m, generator=g_, dtype=torch.float64)
    lr = 0.37
    u_aug, s_hat, v_aug = _sgd_augmented(u, s, v, g, lr)
    lhs = u_aug.basis @ s_hat @ v_aug.basis.T
    rhs = u @ s @ v.T - lr * _tangent_projection(u, v, g)
    assert (lhs - rhs).abs().max() <= 1e-10
    # the augmented bases are orthonormal and contain the old ones
    for aug, old in ((u_aug, u), (v_aug, v)):
        eye = torch.eye(aug.basis.shape[1], dtype=torch.float64)
        assert (aug.basis.T @ aug.basis - eye).abs().max() <= 1e-12
        assert (aug.basis @ (aug.basis.T @ old) - old).abs().max() <= 1e-12


def test_identity_holds_at_zero_coefficients():
    """At initialisation S = 0: no S⁻¹ anywhere, the step is still the tangent step."""
    u, v = random_orthonormal(20, 3), random_orthonormal(10, 3)
    s = torch.zeros(3, 3, dtype=torch.float64)
    g = torch.randn(20, 10, dtype=torch.float64)
    u_aug, s_hat, v_aug = _sgd_augmented(u, s, v, g, 0.1)
    lhs = u_aug.basis @ s_hat @ v_aug.basis.T
    assert torch.allclose(lhs, -0.1 * _tangent_projection(u, v, g), atol=1e-12, rtol=0)


def test_rank_deficient_direction_is_harmless():
    """A direction inside span(U) yields arbitrary new columns whose coefficient blocks are 0."""
    u, v = random_orthonormal(15, 4), random_orthonormal(11, 4)
    d_k = u @ torch.randn(4, 4, dtype=torch.float64)
    aug = integrator.augment_basis(u, d_k)
    assert aug.r22.abs().max() <= 1e-12
    eye = torch.eye(8, dtype=torch.float64)
    assert (aug.basis.T @ aug.basis - eye).abs().max() <= 1e-12
    s_hat = integrator.augmented_coefficients(torch.eye(4, dtype=torch.float64), aug, aug, 0.1)
    assert s_hat[4:, :].abs().max() <= 1e-12
    del v


def test_cap_at_ambient_dimension():
    """When 2r > n only n − r new directions exist."""
    u = random_orthonormal(5, 4)
    aug = integrator.augment_basis(u, torch.randn(5, 4, dtype=torch.float64))
    assert aug.basis.shape == (5, 5)
    assert aug.r22.shape == (1, 4)


def test_truncate_and_coordinate_change():
    """Truncating to full size reproduces Û Ŝ V̂ᵀ; coordinate maps project old coordinates."""
    u, v = random_orthonormal(20, 3), random_orthonormal(12, 3)
    s = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    g = torch.randn(20, 12, dtype=torch.float64)
    u_aug, s_hat, v_aug = _sgd_augmented(u, s, v, g, 0.05)
    p, sigma, qh = torch.linalg.svd(s_hat, full_matrices=False)
    u1, v1 = u_aug.basis @ p, v_aug.basis @ qh.T
    assert torch.allclose(u1 @ torch.diag(sigma) @ v1.T, u_aug.basis @ s_hat @ v_aug.basis.T)
    c_u = integrator.coordinate_change(u_aug.r11, p)
    c = torch.randn(3, dtype=torch.float64)
    assert torch.allclose(u1 @ (c_u @ c), u @ c, atol=1e-12)  # full rank: exact change of basis


def test_batched_matches_single():
    """Leading batch dimensions give the same result as one matrix at a time."""
    us = torch.stack([random_orthonormal(10, 3) for _ in range(4)])
    ds = torch.randn(4, 10, 3, dtype=torch.float64)
    batched = integrator.augment_basis(us, ds)
    for i in range(4):
        single = integrator.augment_basis(us[i], ds[i])
        assert torch.allclose(batched.basis[i], single.basis)
        assert torch.allclose(batched.r22[i], single.r22)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 24),
    m=st.integers(2, 24),
    r_frac=st.floats(0.0, 1.0),
    lr=st.floats(1e-4, 2.0),
    seed=st.integers(0, 2**16),
)
def test_identity_over_shapes(n, m, r_frac, lr, seed):
    """The tangent identity for every shape and rank."""
    r = max(1, int(r_frac * min(n, m)))
    gen = torch.Generator().manual_seed(seed)
    u, v = random_orthonormal(n, r, gen), random_orthonormal(m, r, gen)
    s = torch.diag(torch.rand(r, generator=gen, dtype=torch.float64))
    g = torch.randn(n, m, generator=gen, dtype=torch.float64)
    u_aug, s_hat, v_aug = _sgd_augmented(u, s, v, g, lr)
    lhs = u_aug.basis @ s_hat @ v_aug.basis.T
    rhs = u @ s @ v.T - lr * _tangent_projection(u, v, g)
    scale = 1 + rhs.abs().max()
    assert (lhs - rhs).abs().max() <= 1e-10 * scale


@given(
    n=st.integers(4, 24),
    m=st.integers(4, 24),
    r=st.integers(1, 6),
    mu=st.floats(0.0, 0.9),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=40, deadline=None)
def test_shrinkage_is_the_soft_threshold_of_the_tangent_step(n, m, r, mu, seed):
    """The step's own part of Ŝ is the tangent step ``−λ P(G)`` in the augmented bases, and the
    shrinkage lowers every singular value of Ŝ by ``μ‖λ P(G)‖₂`` (dense SVDs, float64)."""
    r = min(r, n - 1, m - 1)
    g_ = torch.Generator().manual_seed(seed)
    u, v = random_orthonormal(n, r, g_), random_orthonormal(m, r, g_)
    s = torch.diag(torch.rand(r, generator=g_, dtype=torch.float64))
    g = torch.randn(n, m, generator=g_, dtype=torch.float64)
    lr = 0.3
    u_aug, s_hat, v_aug = _sgd_augmented(u, s, v, g, lr)
    step = integrator.augmented_coefficients(-lr * (u.T @ g @ v), u_aug, v_aug, lr)
    tangent = lr * _tangent_projection(u, v, g)
    assert (u_aug.basis @ step @ v_aug.basis.T + tangent).abs().max() <= 1e-10
    sigma = torch.linalg.svdvals(s_hat)
    shrunk = integrator.shrink_singular_values(sigma, step, mu)
    expected = (
        torch.linalg.svdvals(u @ s @ v.T - tangent)[: sigma.numel()]
        - mu * torch.linalg.svdvals(tangent)[0]
    ).clamp(min=0)
    assert torch.allclose(shrunk, expected, atol=1e-10, rtol=0)
    assert bool((shrunk <= sigma).all()) and (mu > 0 or torch.equal(shrunk, sigma))
