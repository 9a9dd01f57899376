"""GeoLoRAOptimizer: rank growth and shrinkage, orthonormality, training, torch integration."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model, rank_report


def _regression(
    rank_change, r0, r_max=48, tau=0.01, dtype=torch.float64, seed=0, size=1 / 8, **cfg
):
    """A 64×48 layer whose target weight is the base weight plus a rank-k change."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(48, 64, bias=False).to(dtype)
    change = torch.randn(64, rank_change, generator=gen, dtype=dtype)
    change = change @ torch.randn(rank_change, 48, generator=gen, dtype=dtype) * size
    target = layer.weight.detach() + change
    net = nn.Sequential(layer)
    config = GeoLoRAConfig(target_modules=["0"], r=r0, r_max=r_max, tau=tau, **cfg)
    get_geolora_model(net, config)
    return net, target, change, gen


def _regression_step(net, target, opt, gen, batch=32):
    x = torch.randn(batch, 48, generator=gen, dtype=target.dtype)
    loss = 0.5 * ((net(x) - x @ target.T) ** 2).sum(-1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _relative_error(net, change):
    return float((net[0].delta_weight().detach() - change).norm() / change.norm())


def test_rank_grows_from_one_to_the_needed_rank():
    """The paper's step (no shrinkage) can double the rank every step."""
    net, target, change, gen = _regression(16, r0=1, shrinkage=0.0)
    opt = GeoLoRAOptimizer(net, lr=0.5, base_rule="sgd")
    ranks = []
    for _ in range(8):
        _regression_step(net, target, opt, gen)
        ranks.append(net[0].current_rank)
    assert ranks[:3] == [2, 4, 8]  # doubling
    assert ranks[-1] >= 16
    for _ in range(192):
        _regression_step(net, target, opt, gen)
    assert _relative_error(net, change) <= 1e-8


@pytest.mark.parametrize("margin, expected", [(0.0, 4), (0.1, 5)])
def test_rank_shrinks_to_the_needed_rank(margin, expected):
    """From 16 down to the change's rank 4 (plus the growth margin ⌈0.1·4⌉ = 1 by default)."""
    net, target, change, gen = _regression(4, r0=16, rank_margin=margin)
    opt = GeoLoRAOptimizer(net, lr=0.5, base_rule="sgd")
    for _ in range(200):
        _regression_step(net, target, opt, gen)
    assert net[0].current_rank == expected
    assert _relative_error(net, change) <= 1e-8
    assert rank_report(net)["adapter_params"] == expected * (64 + 48 + 1)


def test_small_step_with_large_tau_still_grows():
    """Growth does not stall where the relative τ alone stalled it (spec §2's known property:
    stuck at rank 13, error 0.3): the growth margin lets new directions build up over steps."""
    net, target, change, gen = _regression(16, r0=1, tau=0.05)
    opt = GeoLoRAOptimizer(net, lr=0.2, base_rule="sgd")
    for _ in range(100):
        _regression_step(net, target, opt, gen)
    assert net[0].current_rank >= 16 and _relative_error(net, change) <= 1e-6


def test_without_margin_growth_stalls():
    """The margin is what keeps growth going: with ``rank_margin=0`` the same problem stalls
    below its rank once the leading directions are fitted."""
    net, target, change, gen = _regression(12, r0=1, tau=0.1, size=1 / 128, rank_margin=0.0)
    opt = GeoLoRAOptimizer(net)
    for _ in range(400):
        _regression_step(net, target, opt, gen)
    assert net[0].current_rank < 12 and _relative_error(net, change) > 0.05


def test_growth_from_rank_one_with_default_settings():
    """A rank-12 change found from rank 1 by the defaults alone (base rule, lr, τ, margin)."""
    net, target, change, gen = _regression(12, r0=1, tau=GeoLoRAConfig.tau, size=1 / 128)
    opt = GeoLoRAOptimizer(net)
    for _ in range(400):
        _regression_step(net, target, opt, gen)
    assert 12 <= net[0].current_rank <= 12 + 2  # the rank plus its margin ⌈0.1·12⌉
    assert _relative_error(net, change) <= 1e-2


def test_final_ranks_equal_across_initial_ranks():
    final = {}
    for r0 in (1, 4, 16):
        net, target, change, gen = _regression(6, r0=r0, tau=GeoLoRAConfig.tau, size=1 / 128)
        opt = GeoLoRAOptimizer(net)
        for _ in range(300):
            _regression_step(net, target, opt, gen)
        final[r0] = net[0].current_rank
        assert _relative_error(net, change) <= 1e-3
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
    any initial rank within 360 steps; without it, the directions that a start at r = 16 kept from
    its first noisy steps are still there (they random-walk and fall under τ only later, near step
    400). A stronger μ = 0.03 settles within 300 steps."""
    final = [_noisy_signal_rank(r0, GeoLoRAConfig.shrinkage, steps=360) for r0 in (1, 4, 16)]
    assert all(3 <= r <= 4 for r in final), final  # 2 + ⌈0.1·2⌉, and one more at most
    assert _noisy_signal_rank(16, 0.0, steps=360) >= 5
    assert all(3 <= _noisy_signal_rank(r0, 0.03) <= 4 for r0 in (1, 4, 16))


def test_bases_rotate_at_r_max():
    """A layer that starts at ``r = r_max`` still rotates its bases: the augmentation adds ``r``
    directions and only the truncation caps the rank (with the cap in the augmentation, the span
    of U moved by 1e-14 and the fit error stayed 0.98)."""
    net, target, change, gen = _regression(4, r0=8, r_max=8, tau=0.0, shrinkage=0.0)
    u0 = net[0].U.detach().clone()
    opt = GeoLoRAOptimizer(net, lr=0.5, base_rule="sgd")
    for _ in range(150):
        _regression_step(net, target, opt, gen)
    assert net[0].current_rank == 8
    u1 = net[0].U.detach()
    assert (u1 - u0 @ (u0.T @ u1)).norm() > 1.0  # the span moved
    assert _relative_error(net, change) <= 1e-6


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
    scales = {_regression(4, r0=r0, r_max=16)[0][0].scale for r0 in (1, 2, 8, 16)}
    assert scales == {1.0}


def test_growth_up_to_full_rank():
    net, target, change, gen = _regression(48, r0=8, tau=0.0, shrinkage=0.0)
    opt = GeoLoRAOptimizer(net, lr=0.5, base_rule="sgd")
    for _ in range(6):
        _regression_step(net, target, opt, gen)
    assert net[0].current_rank == 48 == net[0].r_max


def test_bases_stay_orthonormal_float32():
    net, target, _, gen = _regression(8, r0=4, dtype=torch.float32, tau=0.05)
    opt = GeoLoRAOptimizer(net, lr=1e-2, base_rule="adam")
    for _ in range(500):
        _regression_step(net, target, opt, gen)
    u, s, v = (t.detach() for t in net[0].active_factors())
    eye = torch.eye(u.shape[1])
    assert (u.T @ u - eye).norm() <= 1e-5
    assert (v.T @ v - eye).norm() <= 1e-5
    assert torch.equal(s, torch.diag(torch.diagonal(s)))  # diagonal after every step
    assert bool((torch.diagonal(s)[:-1] >= torch.diagonal(s)[1:]).all())  # sorted singular values


def _bert_batch(gen, batch=8, length=10):
    ids = torch.randint(0, 64, (batch, length), generator=gen)
    labels = (ids[:, 0] % 2).long()  # a learnable rule
    return ids, labels


@pytest.mark.parametrize(
    "base_rule, lr, other_lr, factor",
    [
        ("riemannian_adam", 1e-2, 1e-2, 0.7),
        ("riemannian_adam_rows", 1e-2, 1e-2, 0.7),
        ("adam", 1e-2, 1e-2, 0.7),
        ("sgd", 0.3, 1e-3, 0.95),
    ],
)
def test_every_base_rule_train_tiny_bert(tiny_bert, base_rule, lr, other_lr, factor):
    cfg = GeoLoRAConfig(
        target_modules=["query", "value", "dense"],
        r=2,
        r_max=8,
        tau=0.1,
        modules_to_save=["classifier"],
    )
    model = get_geolora_model(tiny_bert, cfg).train()
    opt = GeoLoRAOptimizer(model, lr=lr, base_rule=base_rule, other_lr=other_lr)
    gen = torch.Generator().manual_seed(1)
    ids, labels = _bert_batch(gen, batch=32)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < factor * losses[0]
    report = rank_report(model)
    assert report["total_rank"] != 2 * len(report["ranks"])  # ranks moved


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def test_nan_gradient_refused_and_nothing_changes(tiny_bert):
    model = get_geolora_model(
        tiny_bert, GeoLoRAConfig(target_modules=["query"], modules_to_save=["classifier"])
    )
    opt = GeoLoRAOptimizer(model, lr=1e-2)
    ids, labels = _bert_batch(torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()
    layer = model.bert.encoder.layer[0].attention.self.query
    layer.U.grad[0, 0] = float("nan")
    before_model, before_opt = _snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"query\.U.*step refused"):
        opt.step()
    after_model, after_opt = _snapshot(model, opt)
    for key, value in before_model.items():
        assert torch.equal(value, after_model[key]), key
    assert str(before_opt) == str(after_opt)


def test_gradient_accumulation_equals_full_batch():
    def run(micro):
        torch.manual_seed(0)
        net, target, _, _ = _regression(6, r0=2, seed=3)
        opt = GeoLoRAOptimizer(net, lr=0.3, base_rule="sgd")
        gen = torch.Generator().manual_seed(7)
        for _ in range(5):
            x = torch.randn(32, 48, generator=gen, dtype=torch.float64)
            for chunk in x.chunk(micro):
                loss = 0.5 * ((net(chunk) - chunk @ target.T) ** 2).sum(-1).mean() / micro
                loss.backward()
            opt.step()
            opt.zero_grad()
        return net[0].delta_weight().detach()

    assert torch.allclose(run(1), run(4), atol=1e-10)


def test_scheduler_and_clipping():
    net, target, _, gen = _regression(4, r0=2, dtype=torch.float32)
    opt = GeoLoRAOptimizer(net, lr=0.1, base_rule="sgd")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    x = torch.randn(32, 48, generator=gen)
    ((net(x) - x @ target.T) ** 2).mean().backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3)
    assert (
        float(
            torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None]).norm()
        )
        <= 1e-3 + 1e-9
    )
    opt.step()
    opt.zero_grad()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = net[0].delta_weight().detach().clone()
    _regression_step(net, target, opt, gen)
    assert torch.allclose(net[0].delta_weight().detach(), frozen, atol=1e-6)  # lr 0: no move


@pytest.mark.parametrize("base_rule", ["adam", "sgd"])
def test_state_dict_round_trip_while_ranks_change(base_rule):
    def fresh():
        net, target, _, _ = _regression(8, r0=1, dtype=torch.float64, seed=5)
        return (
            net,
            target,
            GeoLoRAOptimizer(
                net, lr=0.05 if base_rule == "adam" else 0.3, base_rule=base_rule, momentum=0.5
            ),
        )

    net, target, opt = fresh()
    gen = torch.Generator().manual_seed(11)
    for _ in range(4):
        _regression_step(net, target, opt, gen)
    saved_model, saved_opt = _snapshot(net, opt)
    gen_state = gen.get_state()
    for _ in range(6):
        _regression_step(net, target, opt, gen)
    net2, _, opt2 = fresh()
    net2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    gen.set_state(gen_state)
    ranks = []
    for _ in range(6):
        _regression_step(net2, target, opt2, gen)
        ranks.append(net2[0].current_rank)
    assert len(set(ranks)) > 1 or ranks[0] != 1  # ranks did change during the resumed run
    assert torch.allclose(net2[0].delta_weight(), net[0].delta_weight(), atol=1e-10)


def test_optimizer_state_of_other_ranks_refused():
    net, target, _, gen = _regression(8, r0=1)
    opt = GeoLoRAOptimizer(net, lr=0.5, base_rule="sgd", momentum=0.5)
    _regression_step(net, target, opt, gen)
    state = opt.state_dict()
    net2, _, _, _ = _regression(8, r0=1)
    with pytest.raises(ValueError, match="saved at rank 2.*load the model checkpoint"):
        GeoLoRAOptimizer(net2, lr=0.5, base_rule="sgd", momentum=0.5).load_state_dict(state)


def test_global_budget_and_warmup_and_freeze():
    net = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10))
    cfg = GeoLoRAConfig(
        target_modules=["0", "2"], r=2, r_max=8, budget=6, warmup_steps=2, freeze_ranks_after=5
    )
    get_geolora_model(net, cfg)
    opt = GeoLoRAOptimizer(net, lr=0.05)
    gen = torch.Generator().manual_seed(0)
    totals = []
    for _ in range(8):
        x = torch.randn(16, 20, generator=gen)
        net(x).pow(2).mean().neg().backward()
        opt.step()
        opt.zero_grad()
        totals.append(rank_report(net)["ranks"])
    assert sum(totals[0].values()) == 8  # warm-up: no truncation, 2 → 4 per layer
    assert all(sum(r.values()) <= 6 for r in totals[2:])  # then the budget holds
    assert totals[5] == totals[6] == totals[7]  # frozen


def test_bad_optimizer_arguments(tiny_bert):
    with pytest.raises(ValueError, match="get_geolora_model"):
        GeoLoRAOptimizer(tiny_bert)
    model = get_geolora_model(tiny_bert, GeoLoRAConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="base_rule"):
        GeoLoRAOptimizer(model, base_rule="lion")
    with pytest.raises(ValueError, match="lr > 0"):
        GeoLoRAOptimizer(model, lr=-1.0)


def test_sgd_with_large_lr_warns_about_adamw_on_the_head(tiny_bert):
    model = get_geolora_model(
        tiny_bert, GeoLoRAConfig(target_modules=["query"], modules_to_save=["classifier"])
    )
    with pytest.warns(UserWarning, match="Pass other_lr"):
        GeoLoRAOptimizer(model, lr=0.5, base_rule="sgd")


def test_plain_optimizer_on_factors_raises_before_changing_anything(tiny_bert):
    from geolora.guard import PlainOptimizerError

    model = get_geolora_model(
        tiny_bert, GeoLoRAConfig(target_modules=["query"], modules_to_save=["classifier"])
    )
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids, labels = _bert_batch(torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=labels).loss.backward()
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for _ in range(2):  # refused on every try, not only the first
        with pytest.raises(PlainOptimizerError, match="nothing was changed.*GeoLoRAOptimizer"):
            plain.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    head_only = torch.optim.AdamW(model.classifier.parameters(), lr=1e-3)
    head_only.step()  # no factors: allowed (and remembered)
    query = model.bert.encoder.layer[0].attention.self.query
    head_only.add_param_group({"params": [query.U]})
    with pytest.raises(PlainOptimizerError, match="AdamW is about to step 1 GeoLoRA factor"):
        head_only.step()


def test_step_without_adapter_gradients_warns_once():
    """A loss that bypasses the adapters (e.g. reentrant checkpointing on a frozen model with
    transformers < 5) would leave them untrained in silence: the optimizer says so, once."""
    net, _, _, _ = _regression(2, r0=2)
    head = nn.Linear(48, 1, dtype=torch.float64)
    net.append(head)
    head.requires_grad_(True)
    opt = GeoLoRAOptimizer(net, lr=1e-2)
    before = net[0].U.detach().clone()
    x = torch.randn(4, 48, dtype=torch.float64)
    with pytest.warns(UserWarning, match="no gradient on any adapter.*enable_input_require_grads"):
        head(x).sum().backward()
        opt.step()
    opt.zero_grad()
    head(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once only
    assert torch.equal(net[0].U, before)


def _rotated_start_run(base_rule: str, rotate: bool, steps: int = 4):
    """Four steps of a 64×48 regression from r = 4 whose initial bases are (or are not) turned
    by random rotations within their spans; returns the ranks and ``ΔW`` after each step."""
    torch.manual_seed(0)  # the same initial spans
    net, target, _, gen = _regression(6, r0=4, tau=0.1)
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
        _regression_step(net, target, opt, gen)
        trace.append((layer.current_rank, layer.delta_weight().detach().clone()))
    return trace


@pytest.mark.parametrize("base_rule", ["riemannian_adam", "riemannian_adam_rows"])
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
