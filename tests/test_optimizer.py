"""GeoLoRAOptimizer: training every base rule, bad input, state, torch integration."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from regression_problem import regression, regression_step
from torch import nn

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model, rank_report


def _bert_batch(gen, batch=8, length=10):
    ids = torch.randint(0, 64, (batch, length), generator=gen)
    labels = (ids[:, 0] % 2).long()  # a learnable rule
    return ids, labels


@pytest.mark.parametrize(
    "base_rule, lr, other_lr, factor",
    [
        ("riemannian_adam", 1e-2, 1e-2, 0.7),
        ("riemannian_adam_rows", 1e-2, 1e-2, 0.7),
        ("riemannian_adam_features", 1e-2, 1e-2, 0.7),
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
        net, target, _, _ = regression(6, r0=2, seed=3)
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
    net, target, _, gen = regression(4, r0=2, dtype=torch.float32)
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
    regression_step(net, target, opt, gen)
    assert torch.allclose(net[0].delta_weight().detach(), frozen, atol=1e-6)  # lr 0: no move


def _in_old_layout(state_dict: dict) -> dict:
    """A state dict as geolora wrote it before the row second moments took one column (full
    ``K_sq``, ``L_sq``, ``S_sq`` blocks whose active entries all hold the row's value) and before
    the option ``first_moment_correction`` (the correction was always applied)."""
    old = copy.deepcopy(state_dict)
    for group in old["param_groups"]:
        group.pop("first_moment_correction", None)
    for state in old["state"].values():
        if "K_rsq" not in state:
            continue
        live = (torch.arange(state["K"].shape[1]) < state["rank"]).to(state["K"])
        for key in ("K", "L", "S"):
            state[f"{key}_sq"] = state.pop(f"{key}_rsq") * live
    return old


@pytest.mark.parametrize(
    "base_rule, layout",
    [
        ("adam", "current"),
        ("sgd", "current"),
        ("riemannian_adam_features", "current"),
        ("riemannian_adam_features", "old layout"),
        ("riemannian_adam_rows", "old layout"),
        ("adam", "old layout"),
    ],
)
def test_state_dict_round_trip_while_ranks_change(base_rule, layout):
    def fresh(correction=False):
        net, target, _, _ = regression(8, r0=1, dtype=torch.float64, seed=5)
        lr = 0.3 if base_rule == "sgd" else 0.05
        opt = GeoLoRAOptimizer(
            net, lr=lr, base_rule=base_rule, momentum=0.5, first_moment_correction=correction
        )
        return net, target, opt

    old = layout == "old layout"
    net, target, opt = fresh(correction=old)  # old files were written by corrected runs
    gen = torch.Generator().manual_seed(11)
    for _ in range(4):
        regression_step(net, target, opt, gen)
    saved_model, saved_opt = _snapshot(net, opt)
    if base_rule.startswith("riemannian_adam_"):  # one column per row moment, not r_max
        n = net[0].out_features
        assert opt.state[net[0].U]["K_rsq"].shape == (n, 1) and "K_sq" not in opt.state[net[0].U]
    if old:
        saved_opt = _in_old_layout(saved_opt)
        if base_rule.startswith("riemannian_adam_"):
            assert "K_sq" in saved_opt["state"][0] and "K_rsq" not in saved_opt["state"][0]
    gen_state = gen.get_state()
    for _ in range(6):
        regression_step(net, target, opt, gen)
    net2, _, opt2 = fresh()
    net2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["first_moment_correction"] is old  # the run's own, kept
    gen.set_state(gen_state)
    ranks = []
    for _ in range(6):
        regression_step(net2, target, opt2, gen)
        ranks.append(net2[0].current_rank)
    assert len(set(ranks)) > 1 or ranks[0] != 1  # ranks did change during the resumed run
    assert torch.allclose(net2[0].delta_weight(), net[0].delta_weight(), atol=1e-10)


@pytest.mark.parametrize("base_rule", ["riemannian_adam_features", "riemannian_adam", "adam"])
def test_first_step_without_first_moment_correction_is_a_tenth(base_rule):
    """Uncorrected, the first step moves by ``(1 − β₁) λ D``: from ``S = 0`` the whole update is
    linear in the step (the rank rule and the shrinkage are relative), so ``ΔW`` is exactly a
    tenth of the corrected run's, with the same rank and the same first moments."""
    runs = []
    for correction in (True, False):
        torch.manual_seed(0)  # the same base weight and bases
        net, target, _, _ = regression(8, r0=4, dtype=torch.float64, seed=5)
        opt = GeoLoRAOptimizer(
            net, lr=0.05, base_rule=base_rule, first_moment_correction=correction
        )
        regression_step(net, target, opt, torch.Generator().manual_seed(11))
        runs.append((net[0], opt.state[net[0].U]))
    (corrected, state_c), (raw, state_r) = runs
    assert corrected.current_rank == raw.current_rank > 4  # the first step still grows the rank
    torch.testing.assert_close(
        raw.delta_weight(), 0.1 * corrected.delta_weight(), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(state_r["K"], state_c["K"], rtol=1e-9, atol=1e-12)


def test_default_first_moment_is_adams_corrected_form():
    """The default applies Adam's bias correction (under any lr schedule it fits better than the
    uncorrected ramp, docs/algorithm.md §8): its first step equals the explicitly corrected one."""
    deltas = []
    for kwargs in ({}, {"first_moment_correction": True}):
        torch.manual_seed(0)
        net, target, _, _ = regression(8, r0=4, dtype=torch.float64, seed=5)
        opt = GeoLoRAOptimizer(net, lr=0.05, **kwargs)
        regression_step(net, target, opt, torch.Generator().manual_seed(11))
        assert opt.param_groups[0]["first_moment_correction"] is True
        deltas.append(net[0].delta_weight())
    torch.testing.assert_close(deltas[0], deltas[1], rtol=0, atol=0)


def test_optimizer_state_of_other_ranks_refused():
    net, target, _, gen = regression(8, r0=1)
    opt = GeoLoRAOptimizer(net, lr=0.5, base_rule="sgd", momentum=0.5)
    regression_step(net, target, opt, gen)
    state = opt.state_dict()
    net2, _, _, _ = regression(8, r0=1)
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
    with pytest.raises(TypeError, match="first_moment_correction must be True or False"):
        GeoLoRAOptimizer(model, first_moment_correction="no")  # a string would be truthy


def test_sgd_with_large_lr_warns_about_adamw_on_the_head(tiny_bert):
    model = get_geolora_model(
        tiny_bert, GeoLoRAConfig(target_modules=["query"], modules_to_save=["classifier"])
    )
    with pytest.warns(UserWarning, match="Pass other_lr"):
        GeoLoRAOptimizer(model, lr=0.5, base_rule="sgd")


def test_plain_optimizer_on_factors_raises_before_changing_anything(tiny_bert):
    from geolora.optim.guard import PlainOptimizerError

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
    net, _, _, _ = regression(2, r0=2)
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
