"""4-bit NF4 bases (bitsandbytes ``Linear4bit`` on CPU) under GeoLoRA adapters, on a tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_llama import FACTS, save_tiny_llama

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model  # noqa: E402
from geolora.io import load_adapter, save_adapter  # noqa: E402
from geolora.merge import merge_and_unload  # noqa: E402
from geolora.peft_interop import export_peft_lora  # noqa: E402
from geolora.quantized import (  # noqa: E402
    dequantize_model,
    dequantized_weight,
    is_4bit,
    quantize_linear_layers,
)

IDS = torch.tensor([[4, 7, 8, 9, 10, 12, 26, 3, 5]])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


def _base(llama_dir, four_bit: bool):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    if four_bit:
        quantize_linear_layers(model)
    return model


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _trained(llama_dir, steps: int = 5):
    model = _base(llama_dir, four_bit=True)
    get_geolora_model(model, GeoLoRAConfig(target_modules="all-linear", r=2, r_max=4))
    optimizer = GeoLoRAOptimizer(model, lr=0.01)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return model.eval(), losses


def test_quantize_keeps_the_output_layer_and_is_close_to_float(llama_dir):
    float_model, model = _base(llama_dir, False), _base(llama_dir, True)
    quantized = [name for name, m in model.named_modules() if is_4bit(m)]
    assert len(quantized) == 14 and "lm_head" not in quantized
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    original = float_model.get_submodule("model.layers.0.mlp.down_proj").weight
    error = (dequantized_weight(layer) - original).norm() / original.norm()
    assert 0 < error < 0.15  # NF4: about 10 % relative error per matrix
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():  # the layer computes x Q(W0)ᵀ, in training and in evaluation alike
        torch.testing.assert_close(layer(x), x @ dequantized_weight(layer).t())
        layer.train()
        torch.testing.assert_close(layer(x), x @ dequantized_weight(layer).t())


def test_train_save_load_and_peft_export_on_a_4bit_base(llama_dir, tmp_path):
    from peft import PeftModel

    model, losses = _trained(llama_dir)
    assert losses[-1] < losses[0]
    layer = model.get_submodule("model.layers.1.self_attn.q_proj")
    assert is_4bit(layer.base_layer) and layer.S.abs().sum() > 0
    save_adapter(model, tmp_path / "adapter")
    export_peft_lora(model, tmp_path / "peft")
    reloaded = load_adapter(_base(llama_dir, True), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded), _logits(model))
    peft_4bit = PeftModel.from_pretrained(_base(llama_dir, True), str(tmp_path / "peft"))
    torch.testing.assert_close(_logits(peft_4bit), _logits(model), atol=1e-4, rtol=1e-4)
    full = load_adapter(_base(llama_dir, False), tmp_path / "adapter")
    peft_full = PeftModel.from_pretrained(_base(llama_dir, False), str(tmp_path / "peft"))
    torch.testing.assert_close(_logits(peft_full), _logits(full), atol=1e-5, rtol=1e-5)


def test_merge_is_refused_on_4bit_and_exact_after_dequantizing(llama_dir):
    model, _ = _trained(llama_dir, steps=2)
    expected = _logits(model)
    with pytest.raises(ValueError, match="dequantize_model"):
        merge_and_unload(model)
    assert len(dequantize_model(model)) == 14
    merged = merge_and_unload(model)
    assert not any(is_4bit(m) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-4, rtol=1e-4)


def test_bfloat16_compute_trains_float32_factors(llama_dir):
    model = _base(llama_dir, four_bit=False)
    quantize_linear_layers(model, compute_dtype=torch.bfloat16)
    get_geolora_model(model, GeoLoRAConfig(target_modules=["q_proj", "v_proj"], r=2, r_max=4))
    optimizer = GeoLoRAOptimizer(model, lr=0.01)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.base_layer.compute_dtype == torch.bfloat16 and layer.U.dtype == torch.float32
    assert layer.S.abs().sum() > 0


def test_cli_4bit_run_writes_a_merged_float_model(llama_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from geolora.app import cli

    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in FACTS.items()))
    out = tmp_path / "run"
    argv = ["finetune", "--task", "causal-lm", "--model", str(llama_dir), "--dataset", str(data)]
    argv += ["--eval-fraction", "0.25", "--epochs", "1", "--load-in-4bit", "--save-merged"]
    assert cli.main([*argv, "--output-dir", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["options"]["load_in_4bit"] and "merged" in metrics["files"]
    merged = LlamaForCausalLM.from_pretrained(out / "merged")
    assert type(merged.get_submodule("model.layers.0.mlp.up_proj")) is torch.nn.Linear
    prompt = list(FACTS)[0]
    argv = ["generate", str(out), "--prompt", prompt, "--load-in-4bit", "--max-new-tokens", "2"]
    assert cli.main([*argv, "-o", str(tmp_path / "a.jsonl")]) == 0
    assert json.loads((tmp_path / "a.jsonl").read_text())["prompt"] == prompt
