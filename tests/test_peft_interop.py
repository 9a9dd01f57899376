"""export_peft_lora (GeoLoRA → plain peft LoRA) and geolora_from_peft (peft LoRA → GeoLoRA)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, geolora_layers, get_geolora_model
from geolora.peft_interop import export_peft_lora, geolora_from_peft

CONFIGS = {
    "bert": dict(target_modules=["query", "value", "dense"], modules_to_save=["classifier"]),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"]),
    "conv": dict(target_modules=["0", "2"], modules_to_save=["4"]),
}


def _conv_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, (3, 2), stride=2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).eval()


def _batch(kind: str, seed: int, size: int = 8) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if kind == "conv":
        return {"x": torch.randn(size, 3, 9, 9, generator=gen)}
    return {"input_ids": torch.randint(0, 64, (size, 10), generator=gen)}


def _out(kind: str, model: nn.Module, seed: int = 99) -> torch.Tensor:
    batch = _batch(kind, seed, 3)
    with torch.no_grad():
        return model(batch["x"]) if kind == "conv" else model(**batch).logits


def _train(kind: str, model: nn.Module, steps: int = 3) -> None:
    opt = GeoLoRAOptimizer(model, lr=0.05)
    for step in range(steps):
        batch = _batch(kind, step)
        if kind == "conv":
            loss = model(batch["x"]).square().mean()
        else:
            ids = batch["input_ids"]
            labels = ids if kind == "gpt2" else ids[:, 0] % 2
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def _base(kind: str, request) -> nn.Module:
    return _conv_model() if kind == "conv" else request.getfixturevalue(f"tiny_{kind}")


@pytest.fixture(params=list(CONFIGS))
def trained(request):
    """(kind, trained GeoLoRA model in eval mode, untouched copy of its base)."""
    kind = request.param
    base = _base(kind, request)
    reference = copy.deepcopy(base)
    config = GeoLoRAConfig(r=2, r_max=8, tau=0.2, lora_alpha=4, **CONFIGS[kind])
    model = get_geolora_model(base, config)
    _train(kind, model)
    ranks = [layer.current_rank for layer in geolora_layers(model).values()]
    assert len(set(ranks)) > 1, "the test needs different ranks per module"
    return kind, model.eval(), reference


def test_export_loads_in_peft_with_equal_outputs(trained, tmp_path, monkeypatch):
    kind, model, reference = trained
    path = export_peft_lora(model, tmp_path / "lora", base_model_name="tiny/base")
    meta = json.loads((path / "adapter_config.json").read_text())
    ranks = {name: layer.current_rank for name, layer in geolora_layers(model).items()}
    assert meta["rank_pattern"] == ranks == meta["alpha_pattern"]
    assert meta["base_model_name_or_path"] == "tiny/base"
    assert meta["modules_to_save"] == CONFIGS[kind].get("modules_to_save")

    for name in [n for n in sys.modules if n == "geolora" or n.startswith("geolora.")]:
        monkeypatch.setitem(sys.modules, name, None)  # loading must not import geolora
    peft_model = PeftModel.from_pretrained(reference, str(path)).eval()
    monkeypatch.undo()
    inner = peft_model.get_base_model()
    lora = {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
    assert {n: m.r["default"] for n, m in lora.items()} == ranks
    assert all(m.scaling["default"] == 1.0 for m in lora.values())
    torch.testing.assert_close(_out(kind, peft_model), _out(kind, model), rtol=0, atol=1e-5)


def test_import_round_trips_an_exported_adapter(trained, tmp_path):
    kind, model, reference = trained
    path = export_peft_lora(model, tmp_path / "lora")
    expected = _out(kind, model)
    converted = geolora_from_peft(copy.deepcopy(reference), path)
    assert converted.geolora_config.modules_to_save == CONFIGS[kind].get("modules_to_save")
    layers = geolora_layers(converted)
    for name, original in geolora_layers(model).items():
        layer = layers[name]
        assert layer.current_rank == original.current_rank
        torch.testing.assert_close(layer.delta_weight(), original.delta_weight(), rtol=0, atol=1e-6)
        u, s, v = layer.active_factors()
        eye = torch.eye(layer.current_rank)
        torch.testing.assert_close(u.t() @ u, eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(v.t() @ v, eye, rtol=0, atol=1e-5)
        assert torch.equal(s, torch.diag(torch.diagonal(s))) and bool((s >= 0).all())
    torch.testing.assert_close(_out(kind, converted.eval()), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "conv"])
def test_import_from_a_trained_peft_lora(kind, request):
    targets = {"gpt2": ["c_attn", "c_fc"], "conv": ["0", "2"]}[kind]
    lora = LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=targets,
        rank_pattern={targets[1]: 2},
        init_lora_weights=False,  # random B: a non-zero adapter, as after training
        fan_in_fan_out=kind == "gpt2",
    )
    peft_model = get_peft_model(_base(kind, request), lora).eval()
    expected = _out(kind, peft_model)
    model = geolora_from_peft(peft_model)
    ranks = {name.rpartition(".")[2]: la.current_rank for name, la in geolora_layers(model).items()}
    assert ranks == {targets[0]: 4, targets[1]: 2}
    assert model.geolora_config.scale == pytest.approx(6 / 2.0)  # rsLoRA: alpha / sqrt(r)
    torch.testing.assert_close(_out(kind, model), expected, rtol=0, atol=1e-5)
    _train(kind, model.train(), steps=1)  # GeoLoRA trains on from there
    assert all(torch.isfinite(la.S).all() for la in geolora_layers(model).values())


def test_import_refusals(tiny_gpt2, tmp_path):
    dora = get_peft_model(
        copy.deepcopy(tiny_gpt2), LoraConfig(target_modules=["c_fc"], use_dora=True)
    )
    with pytest.raises(ValueError, match="use_dora"):
        geolora_from_peft(dora)
    with pytest.raises(TypeError, match="PeftModel"):
        geolora_from_peft(tiny_gpt2)
    lora = LoraConfig(r=8, target_modules=["c_fc"], fan_in_fan_out=True)
    small = GeoLoRAConfig(target_modules=["c_fc"], r=2, r_max=4)
    with pytest.raises(ValueError, match="rank 8 > r_max=4"):
        geolora_from_peft(get_peft_model(copy.deepcopy(tiny_gpt2), lora), config=small)
    other = GeoLoRAConfig(target_modules=["c_attn"], r=2, r_max=8)
    with pytest.raises(ValueError, match="c_attn.*c_fc"):
        geolora_from_peft(get_peft_model(tiny_gpt2, lora), config=other)


def test_export_refuses_dilated_conv(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    get_geolora_model(model, GeoLoRAConfig(target_modules=["0"], r=2))
    with pytest.raises(ValueError, match="dilation"):
        export_peft_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_export_selects_exactly_the_adapted_modules(tmp_path):
    base = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)))
    reference = copy.deepcopy(base)
    model = get_geolora_model(base, GeoLoRAConfig(target_modules="0", r=2, r_max=4))  # regex
    layer = geolora_layers(model)["0"]
    u, _, v = (t.detach() for t in layer.active_factors())
    layer.set_factors(u, torch.tensor([1.0, 0.5]), v)
    path = export_peft_lora(model, tmp_path / "lora")
    # the list ["0"] would also select "1.0" under the suffix rule: an exact regex is written
    assert json.loads((path / "adapter_config.json").read_text())["target_modules"] == "(?:0)"
    peft_model = PeftModel.from_pretrained(reference, str(path))
    inner = peft_model.get_base_model()
    assert [n for n, m in inner.named_modules() if isinstance(m, LoraLayer)] == ["0"]
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x), rtol=0, atol=1e-6)
