"""merge_adapter, unmerge_adapter, merge_and_unload, disable_adapter: Linear, Conv1D, Conv2d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from geolora import GeoLoRAConfig, GeoLoRALayer, geolora_layers, get_geolora_model
from geolora.merge import disable_adapter, merge_adapter, merge_and_unload, unmerge_adapter

TARGETS = {"bert": ["query", "value", "dense"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


def _conv_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, (3, 2), stride=2, dilation=(1, 2)),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).eval()


@pytest.fixture(params=["bert", "gpt2", "conv"])
def adapted(request):
    """(kind, GeoLoRA model with random factors at random ranks, copy of the base model)."""
    kind = request.param
    base = _conv_model() if kind == "conv" else request.getfixturevalue(f"tiny_{kind}")
    reference = copy.deepcopy(base)
    targets = TARGETS.get(kind, ["0", "2", "4"])
    model = get_geolora_model(
        base, GeoLoRAConfig(target_modules=targets, r=2, r_max=6, lora_alpha=2)
    )
    for layer in geolora_layers(model).values():
        r = int(torch.randint(1, layer.r_max + 1, ()))
        u = torch.linalg.qr(torch.randn(layer.out_features, r)).Q
        v = torch.linalg.qr(torch.randn(layer.in_features, r)).Q
        layer.set_factors(u, torch.rand(r) + 0.5, v)
    return kind, model, reference


def _out(kind: str, model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if kind == "conv":
            return model(torch.randn(2, 3, 9, 9, generator=gen))
        return model(input_ids=torch.randint(0, 64, (2, 7), generator=gen)).logits


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: la.base_layer.weight.detach().clone() for n, la in geolora_layers(model).items()}


def test_merge_then_unmerge(adapted):
    kind, model, reference = adapted
    expected, original = _out(kind, model), _base_weights(model)
    assert not torch.allclose(expected, _out(kind, reference), atol=1e-3), "adapters must act"
    merge_adapter(model)
    assert all(layer.merged for layer in geolora_layers(model).values())
    assert all(not torch.allclose(w, original[n]) for n, w in _base_weights(model).items())
    torch.testing.assert_close(_out(kind, model), expected, rtol=0, atol=1e-5)
    merge_adapter(model)  # a second merge must not add the adapters twice
    torch.testing.assert_close(_out(kind, model), expected, rtol=0, atol=1e-5)
    unmerge_adapter(model)
    assert not any(layer.merged for layer in geolora_layers(model).values())
    for name, weight in _base_weights(model).items():
        torch.testing.assert_close(weight, original[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(_out(kind, model), expected, rtol=0, atol=1e-5)


def test_merge_and_unload_gives_plain_model(adapted):
    kind, model, reference = adapted
    expected = _out(kind, model)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, GeoLoRALayer) for m in plain.modules())
    assert not hasattr(plain, "geolora_config")
    assert [type(m) for m in plain.modules()] == [type(m) for m in reference.modules()]
    assert plain.state_dict().keys() == reference.state_dict().keys()
    torch.testing.assert_close(_out(kind, plain), expected, rtol=0, atol=1e-5)


def test_disable_adapter_gives_base_outputs_and_restores(adapted):
    kind, model, reference = adapted
    expected, base_out = _out(kind, model), _out(kind, reference)
    with disable_adapter(model) as same:
        assert same is model
        torch.testing.assert_close(_out(kind, model), base_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(_out(kind, model), expected, rtol=0, atol=0)

    first = next(iter(geolora_layers(model).values()))
    first.disabled = True  # a flag set before the block is kept after it
    with pytest.raises(RuntimeError, match="inside"), disable_adapter(model):
        raise RuntimeError("inside")
    assert [la.disabled for la in geolora_layers(model).values()].count(True) == 1
    assert first.disabled

    merge_adapter(model)
    with pytest.raises(ValueError, match="unmerge_adapter"), disable_adapter(model):
        pass


def test_no_adapters_is_refused():
    with pytest.raises(ValueError, match="no GeoLoRA layers"):
        merge_adapter(_conv_model())
