"""Smoke test of ``benchmarks/llm_sft.py`` on a tiny config-built Llama (the real run uses
SmolLM2-135M-Instruct): every part runs and lands in the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_llama import save_tiny_llama

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import llm_methods  # noqa: E402
import llm_sft  # noqa: E402


def test_llm_benchmark_smoke(tmp_path):
    model = save_tiny_llama(tmp_path / "model")
    payload = llm_sft.main(["--smoke", "--model", str(model), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "llm_sft.md").read_text()
    data = json.loads((tmp_path / "out" / "llm_sft.json").read_text())
    assert "benchmarks/llm_sft.py --smoke" in data["command"] and data["command"] in md
    assert set(payload["methods"]) == {"geolora", "geolora-budget", "lora", "adalora"}
    for row in ("| zero-shot |", "| GeoLoRA |", "| LoRA r=8 |", "| AdaLoRA |", "4-bit NF4 base"):
        assert row in md
    configs = {(m["method"], m["four_bit"], m["checkpointing"]) for m in payload["memory"]}
    assert ("geolora", True, False) in configs and ("geolora", False, True) in configs
    assert payload["checkpointing_grad_rel_diff"] < 1e-5
    lora = payload["methods"]["lora"]
    # r (n + m) per adapter: q, k, v, o (32→32, 32→16, 32→16, 32→32), gate, up, down (32↔64).
    per_layer = 8 * (64 + 48 + 48 + 64 + 3 * 96)
    assert lora["total_rank"] == 8 * 14 and lora["trainable_params"] == 2 * per_layer
    assert payload["methods"]["geolora-budget"]["trainable_params"] <= lora["trainable_params"]
    sizes = payload["adapter_bytes"]
    assert sizes["stored_r_max"] > sizes["at_final_ranks"] > 0


def test_llm_lr_sweep_smoke(tmp_path):
    import llm_lr

    model = save_tiny_llama(tmp_path / "model")
    payload = llm_lr.main(["--smoke", "--model", str(model), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "llm_lr.md").read_text()
    assert (
        "benchmarks/llm_lr.py --smoke"
        in json.loads((tmp_path / "out" / "llm_lr.json").read_text())["command"]
    )
    runs = payload["runs"]
    assert {tuple(v) for v in runs.values()} == {
        ("geolora", 1e-4),
        ("geolora", 1e-3),
        ("geolora", 1e-2),
        ("geolora-rows", 1e-3),
        ("geolora-rows-budget", 3e-4),
        ("lora", 3e-4),
        ("lora", 3e-3),
    }
    for label in runs:
        assert f"| {label} |" in md
    first = {label: r["first_loss"] for label, r in payload["results"].items()}
    assert len(set(first.values())) == 1  # one batch, one pretrained model: the same first loss
    last = {label: r["last_loss"] for label, r in payload["results"].items() if "GeoLoRA" in label}
    assert len(set(last.values())) == 5  # the lr and the base rule reach each run
    for r in payload["results"].values():  # the early peak is over steps that include the first
        assert r["peak_early_loss"] >= r["first_loss"] and r["mean_late_loss"] > 0


def test_llm_lr_features_sweep_builds_the_features_rule(tmp_path):
    import llm_lr

    model = save_tiny_llama(tmp_path / "model")
    args = ["--smoke", "--sweep", "features", "--model", str(model), "--out", str(tmp_path)]
    payload = llm_lr.main(args)
    command = json.loads((tmp_path / "llm_lr.json").read_text())["command"]
    assert command.endswith("--sweep features")
    assert {tuple(v) for v in payload["runs"].values()} == {
        ("geolora-features", 3e-4),
        ("geolora-features", 3e-3),
        ("geolora-features-budget", 1e-3),
        ("lora", 3e-4),
    }
    rules = {
        method: llm_methods.build(method, str(model), 3, seed=0).optimizer.param_groups[0]
        for method in ("geolora-features", "geolora-features-budget", "geolora-rows", "geolora")
    }
    assert {m: g["base_rule"] for m, g in rules.items()} == {
        "geolora-features": "riemannian_adam_features",
        "geolora-features-budget": "riemannian_adam_features",
        "geolora-rows": "riemannian_adam_rows",
        "geolora": "riemannian_adam",
    }
    with pytest.raises(SystemExit):
        llm_lr.parse_args(["--sweep", "nope"])


def test_gpu_step_refuses_without_cuda(monkeypatch, capsys):
    import gpu_step
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu_step.main(["--smoke"])
    assert stop.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_llm_step_time_smoke(tmp_path):
    import llm_step_time

    model = save_tiny_llama(tmp_path / "model")
    results = llm_step_time.main(["--smoke", "--model", str(model), "--out", str(tmp_path / "o")])
    md = (tmp_path / "o" / "llm_step_time.md").read_text()
    assert "benchmarks/llm_step_time.py --smoke" in md
    assert set(results) == set(llm_step_time.RUNS) and results["LoRA r=8"]["ratio_to_lora"] == 1
    for label, r in results.items():
        assert f"| {label} |" in md and set(r["phase_s"]) == set(llm_step_time.PHASES)
        assert r["step_s"] > 0 and r["total_rank"] > 0
    # the padded grouping takes the same step: the same ranks (the tiny model's are all equal)
    padded = results["GeoLoRA, one padded bucket per shape"]
    assert padded["total_rank"] == results["GeoLoRA"]["total_rank"]
    import geolora.optim.buckets

    assert geolora.optim.buckets.BUCKET_OVERHEAD == 4e6  # restored after the run
