"""GeoLoRAOptimizer's rank dynamics on known-rank problems: growth, shrinkage, rotation at
``r_max``, independence of the initial rank and of the bases' coordinates."""

from __future__ import annotations

import pytest
import torch
from regression_problem import regression, regression_step, relative_error
from torch import nn

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model, rank_report


def test_rank_grows_from_one_to_the_needed_rank():
    """The paper's step (no shrinkage) can double the rank every step."""
    net, target, change, gen = regression(16, r0=1, shrinkage=0.0)
    opt = GeoLoRAOptimizer(net, lr=0.5, base_rule="sgd")
    ranks = []
    for _ in range(8):
        regression_step(net, target, opt, gen)
        ranks.append(net[0].current_rank)
    assert ranks[:3] == [2, 4, 8]  # doubling
    assert ranks[-1] >= 16
    for _ in range(192):
        regression_step(net, target, opt, gen)
    assert relative_error(net, change) <= 1e-8


@pytest.mark.parametrize("margin, expected", [(0.0, 4), (0.1, 5)])
def test_rank_shrinks_to_the_needed_rank(margin, expected):
    """From 16 down to the change's rank 4 (plus the growth margin ⌈0.1·4⌉ = 1 by default)."""
    net, target, change, gen = regression(4, r0=16, rank_margin=margin)
    opt = GeoLoRAOptimizer(net, lr=0.5, base_rule="sgd")
    for _ in range(200):
        regression_step(net, target, opt, gen)
    assert net[0].current_rank == expected
    assert relative_error(net, change) <= 1e-8
    assert rank_report(net)["adapter_params"] == expected * (64 + 48 + 1)


def test_small_step_with_large_tau_still_grows():
    """Growth does not stall where the relative τ alone stalled it (spec §2's known property:
    stuck at rank 13, error 0.3): the growth margin lets new directions build up over steps."""
    net, target, change, gen = regression(16, r0=1, tau=0.05)
    opt = GeoLoRAOptimizer(net, lr=0.2, base_rule="sgd")
    for _ in range(100):
        regression_step(net, target, opt, gen)
    assert net[0].current_rank >= 16 and relative_error(net, change) <= 1e-6


def test_without_margin_growth_stalls():
    """The margin is what keeps growth going: with ``rank_margin=0`` the same problem stalls
    below its rank once the leading directions are fitted."""
    net, target, change, gen = regression(12, r0=1, tau=0.1, size=1 / 128, rank_margin=0.0)
    opt = GeoLoRAOptimizer(net)
    for _ in range(400):
        regression_step(net, target, opt, gen)
    assert net[0].current_rank < 12 and relative_error(net, change) > 0.05


def test_growth_from_rank_one_with_default_settings():
    """A rank-12 change found from rank 1 by the defaults alone (base rule, lr, τ, margin)."""
    net, target, change, gen = regression(12, r0=1, tau=GeoLoRAConfig.tau, size=1 / 128)
    opt = GeoLoRAOptimizer(net)
    for _ in range(400):
        regression_step(net, target, opt, gen)
    assert 12 <= net[0].current_rank <= 12 + 2  # the rank plus its margin ⌈0.1·12⌉
    assert relative_error(net, change) <= 1e-2


def test_final_ranks_equal_across_initial_ranks():
    final = {}
    for r0 in (1, 4, 16):
        net, target, change, gen = regression(6, r0=r0, tau=GeoLoRAConfig.tau, size=1 / 128)
        opt = GeoLoRAOptimizer(net)
        for _ in range(300):
            regression_step(net, target, opt, gen)
        final[r0] = net[0].current_rank
        assert relative_error(net, change) <= 1e-3
    assert len(set(final.values())) == 1 and 6 <= final[1] <= 7, final


def _noisy_signal_rank(r0: int, shrinkage: float, steps: int = 300, seed: int = 0) -> int:
    """Final rank under a gradient that is a fixed rank-2 push plus fresh noise every step
    (``G = −A Bᵀ + 0.3·N``, ``N`` standard normal; the noise has the larger norm per step)."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(48, 64, bias=False)).double()
    get_geolora_model(net, GeoLoRAConfig(target_modules=["0"], r=r0, shrinkage=shrinkage))
    a = torch.linalg.qr(torch.randn(64, 2, generator=gen, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(48, 2, generator=gen, dtype=torch.float64))[0]
    opt = GeoLoRAOptimizer(net)
    eye = torch.eye(48, dtype=torch.float64)
    for _ in range(steps):
        grad = -a @ b.T + 0.3 * torch.randn(64, 48, generator=gen, dtype=torch.float64)
        (net(eye) * grad.T).sum().backward()  # d loss / dW = grad
        opt.step()
        opt.zero_grad()
    return net[0].current_rank


def test_shrinkage_prunes_directions_fed_by_noise_alone():
    """With the default shrinkage the rank settles at the push's rank 2 plus its margin (± 1) from
    any initial rank within 320 steps; without it, the directions that a start at r = 16 kept from
    its first noisy steps are still there (rank 6; they random-walk and fall under τ only later).
    A stronger μ = 0.03 settles within 300 steps."""
    final = [_noisy_signal_rank(r0, GeoLoRAConfig.shrinkage, steps=320) for r0 in (1, 4, 16)]
    assert all(3 <= r <= 4 for r in final), final  # 2 + ⌈0.1·2⌉, and one more at most
    assert _noisy_signal_rank(16, 0.0, steps=320) >= 5
    assert all(3 <= _noisy_signal_rank(r0, 0.03) <= 4 for r0 in (1, 4, 16))


def test_bases_rotate_at_r_max():
    """A layer that starts at ``r = r_max`` still rotates its bases: the augmentation adds ``r``
    directions and only the truncation caps the rank (with the cap in the augmentation, the span
    of U moved by 1e-14 and the fit error stayed 0.98)."""
    net, target, change, gen = regression(4, r0=8, r_max=8, tau=0.0, shrinkage=0.0)
    u0 = net[0].U.detach().clone()
    opt = GeoLoRAOptimizer(net, lr=0.5, base_rule="sgd")
    for _ in range(150):
        regression_step(net, target, opt, gen)
    assert net[0].current_rank == 8
    u1 = net[0].U.detach()
    assert (u1 - u0 @ (u0.T @ u1)).norm() > 1.0  # the span moved
    assert relative_error(net, change) <= 1e-6


def test_zero_first_gradient_keeps_the_rank():
    """A zero gradient at S = 0 (e.g. behind a zero-initialised head) leaves the layer as it is,
    instead of collapsing it to ``r_min``; the rank grows once gradients arrive."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    nn.init.zeros_(net[2].weight)
    get_geolora_model(net, GeoLoRAConfig(target_modules=["0"], r=4, r_max=12, tau=0.1))
    net[2].weight.requires_grad_(True)
    net[2].bias.requires_grad_(True)
    opt = GeoLoRAOptimizer(net, lr=1e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 3)
    ((net(x) - y) ** 2).mean().backward()
    assert float(net[0].U.grad.abs().max()) == 0.0  # the head is zero: no gradient reaches U
    opt.step()
    opt.zero_grad()
    u1 = net[0].U.detach()[:, :4]
    assert net[0].current_rank == 4 and float(net[0].S.detach().abs().max()) == 0.0
    assert torch.allclose(u1.T @ u1, torch.eye(4), atol=1e-6)
    for _ in range(30):
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert net[0].current_rank >= 4


def test_scale_does_not_depend_on_the_initial_rank():
    """Default scale s = 1 for every r, so the effective learning rate does not move with r;
    an explicit ``lora_alpha`` keeps peft's ``lora_alpha / r`` (or ``/ sqrt(r)``)."""
    assert {GeoLoRAConfig(target_modules=["q"], r=r).scale for r in (1, 2, 8, 32)} == {1.0}
    assert GeoLoRAConfig(target_modules=["q"], r=8, lora_alpha=16).scale == 2.0
    cfg = GeoLoRAConfig(target_modules=["q"], r=4, lora_alpha=16, use_rslora=True)
    assert cfg.scale == 8.0
    # what the layers use: the same scale from every initial rank
    scales = {regression(4, r0=r0, r_max=16)[0][0].scale for r0 in (1, 2, 8, 16)}
    assert scales == {1.0}


def test_growth_up_to_full_rank():
    net, target, change, gen = regression(48, r0=8, tau=0.0, shrinkage=0.0)
    opt = GeoLoRAOptimizer(net, lr=0.5, base_rule="sgd")
    for _ in range(6):
        regression_step(net, target, opt, gen)
    assert net[0].current_rank == 48 == net[0].r_max


def test_bases_stay_orthonormal_float32():
    net, target, _, gen = regression(8, r0=4, dtype=torch.float32, tau=0.05)
    opt = GeoLoRAOptimizer(net, lr=1e-2, base_rule="adam")
    for _ in range(500):
        regression_step(net, target, opt, gen)
    u, s, v = (t.detach() for t in net[0].active_factors())
    eye = torch.eye(u.shape[1])
    assert (u.T @ u - eye).norm() <= 1e-5
    assert (v.T @ v - eye).norm() <= 1e-5
    assert torch.equal(s, torch.diag(torch.diagonal(s)))  # diagonal after every step
    assert bool((torch.diagonal(s)[:-1] >= torch.diagonal(s)[1:]).all())  # sorted singular values


def _rotated_start_run(base_rule: str, rotate: bool, steps: int = 4):
    """Four steps of a 64×48 regression from r = 4 whose initial bases are (or are not) turned
    by random rotations within their spans; returns the ranks and ``ΔW`` after each step."""
    torch.manual_seed(0)  # the same initial spans
    net, target, _, gen = regression(6, r0=4, tau=0.1)
    layer = net[0]
    if rotate:
        turn = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for factor in (layer.U, layer.V):
                q, _ = torch.linalg.qr(torch.randn(4, 4, generator=turn, dtype=factor.dtype))
                factor[:, :4] = factor[:, :4] @ q
    opt = GeoLoRAOptimizer(net, lr=1e-2, base_rule=base_rule)
    trace = []
    for _ in range(steps):
        regression_step(net, target, opt, gen)
        trace.append((layer.current_rank, layer.delta_weight().detach().clone()))
    return trace


@pytest.mark.parametrize(
    "base_rule", ["riemannian_adam", "riemannian_adam_rows", "riemannian_adam_features"]
)
def test_steps_and_ranks_do_not_depend_on_the_bases_coordinates(base_rule):
    """Turning the bases within their spans (the same point, other coordinates) changes neither
    the ranks nor the weights the steps reach; per-coordinate ``adam`` does depend on them."""
    plain, turned = _rotated_start_run(base_rule, False), _rotated_start_run(base_rule, True)
    for (rank_a, delta_a), (rank_b, delta_b) in zip(plain, turned):
        assert rank_a == rank_b
        torch.testing.assert_close(delta_a, delta_b, rtol=0, atol=1e-10)
    adam_plain, adam_turned = _rotated_start_run("adam", False), _rotated_start_run("adam", True)
    assert (adam_plain[-1][1] - adam_turned[-1][1]).norm() > 1e-6 * adam_plain[-1][1].norm()


def test_rows_rule_keeps_an_outlier_feature_at_the_step_of_the_others():
    """One input feature 100× larger than the rest (the outlier activations of causal LMs):
    with one scalar per adapter its column of ``ΔW`` moves 14× more than the others' in the
    first step (per-coordinate adam: 1.5×); with the row caps, 3.3×."""

    def first_step(base_rule):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 24, bias=False)).double()
        get_geolora_model(net, GeoLoRAConfig(target_modules=["0"], r=4, r_max=8))
        opt = GeoLoRAOptimizer(net, lr=1e-2, base_rule=base_rule)
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        x[:, 0] *= 100
        net(x).square().sum().backward()
        opt.step()
        columns = net[0].delta_weight().detach().norm(dim=0)
        return float(columns[0] / columns[1:].mean())

    scalar, rows = first_step("riemannian_adam"), first_step("riemannian_adam_rows")
    assert scalar > 10
    assert rows < 5
