"""GeoLoRA layers and model injection: identity at init, the three gradients, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from geolora import GeoLoRAConfig, get_geolora_model, rank_report
from geolora.autograd import column_major, thin_weight_grad
from geolora.layers import GeoLoRAConv1D, GeoLoRAConv2d, GeoLoRALinear


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, (3, 2), stride=2)
    )


def test_identity_at_init_linear(tiny_bert):
    ids = torch.randint(0, 64, (3, 10))
    before = tiny_bert(input_ids=ids).logits
    model = get_geolora_model(tiny_bert, GeoLoRAConfig(target_modules=["query", "value", "dense"]))
    assert any(isinstance(m, GeoLoRALinear) for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, before)


def test_identity_at_init_conv1d(tiny_gpt2):
    ids = torch.randint(0, 64, (2, 12))
    before = tiny_gpt2(input_ids=ids).logits
    model = get_geolora_model(tiny_gpt2, GeoLoRAConfig(target_modules=["c_attn", "c_fc"], r=4))
    assert sum(isinstance(m, GeoLoRAConv1D) for m in model.modules()) == 4
    assert torch.equal(model(input_ids=ids).logits, before)


def test_identity_at_init_conv2d():
    net = _conv_net()
    x = torch.randn(2, 3, 9, 9)
    before = net(x)
    get_geolora_model(net, GeoLoRAConfig(target_modules=["0", "2"], r=2, r_max=6))
    assert sum(isinstance(m, GeoLoRAConv2d) for m in net.modules()) == 2
    assert torch.equal(net(x), before)


def _dense_weight_grad(layer, x, dy):
    """∇_W L of the layer's effective weight, computed densely by autograd."""
    w0 = layer.base_layer.weight.detach()
    if isinstance(layer, GeoLoRAConv2d):
        w = (w0 + layer.delta_weight().detach().reshape(w0.shape)).requires_grad_()
        y = F.conv2d(x, w, None, layer.base_layer.stride, layer.base_layer.padding)
        (y * dy).sum().backward()
        return w.grad.reshape(w.shape[0], -1)
    w = (w0 + layer.delta_weight().detach()).requires_grad_()
    (F.linear(x, w) * dy).sum().backward()
    return w.grad


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    k=st.integers(1, 12),
    r=st.integers(1, 6),
    width=st.integers(0, 4),
)
def test_blas_layouts_keep_the_products(lead, k, r, width):
    """The adapter's matmuls use the layouts CPU BLAS multiplies fastest: ``column_major`` is the
    same matrix with contiguous columns (also for a slice of a wider factor), and
    ``thin_weight_grad`` is ``Xᵀ G`` summed over all leading dimensions."""
    gen = torch.Generator().manual_seed(k * 100 + r)
    factor = torch.randn(k, r + width, dtype=torch.float64, generator=gen)[:, :r]
    moved = column_major(factor)
    assert torch.equal(moved, factor)
    assert moved.t().is_contiguous()  # each column contiguous
    x = torch.randn(*lead, k, dtype=torch.float64, generator=gen)
    g = torch.randn(*lead, r, dtype=torch.float64, generator=gen)
    expected = torch.einsum("...k,...r->kr", x, g)
    assert torch.allclose(thin_weight_grad(x, g), expected, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_backward_gives_gk_gl_gs(kind):
    """U.grad = s G V, V.grad = s Gᵀ U, S.grad = s Uᵀ G V with G = ∇_W L, also at S = 0."""
    torch.set_default_dtype(torch.float64)
    try:
        if kind == "linear":
            net = nn.Sequential(nn.Linear(7, 5, bias=False))
            x = torch.randn(4, 3, 7)
        else:
            net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False))
            x = torch.randn(2, 3, 6, 6)
        get_geolora_model(net, GeoLoRAConfig(target_modules=["0"], r=2, r_max=4, lora_alpha=3))
        layer = net[0]
        for s_value in (torch.zeros(2, 2), torch.randn(2, 2)):
            with torch.no_grad():
                layer.S[:2, :2] = s_value
            x_req = x.clone().requires_grad_()
            y = net(x_req)
            dy = torch.randn_like(y)
            net.zero_grad()
            (y * dy).sum().backward()
            g = _dense_weight_grad(layer, x, dy)
            u, _, v = (t.detach() for t in layer.active_factors())
            s = layer.scale
            assert torch.allclose(layer.U.grad[:, :2], s * g @ v, atol=1e-10)
            assert torch.allclose(layer.V.grad[:, :2], s * g.T @ u, atol=1e-10)
            assert torch.allclose(layer.S.grad[:2, :2], s * u.T @ g @ v, atol=1e-10)
            assert layer.U.grad[:, 2:].abs().max() == 0  # inactive columns get nothing
            # input gradient equals the dense layer's
            x_ref = x.clone().requires_grad_()
            w = layer.base_layer.weight + layer.delta_weight().reshape(
                layer.base_layer.weight.shape
            )
            y_ref = F.linear(x_ref, w) if kind == "linear" else F.conv2d(x_ref, w, padding=1)
            (y_ref * dy).sum().backward()
            assert torch.allclose(x_req.grad, x_ref.grad, atol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


def test_base_is_frozen_and_head_trains(tiny_bert):
    cfg = GeoLoRAConfig(target_modules=["query", "value"], r=4, modules_to_save=["classifier"])
    model = get_geolora_model(tiny_bert, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".U", ".S", ".V")) or n.startswith("classifier") for n in trainable)
    assert any(n.startswith("classifier") for n in trainable)
    report = rank_report(model)
    assert report["total_rank"] == 4 * 4  # 2 layers × (query, value)
    assert report["adapter_params"] == 4 * (4 * (32 + 32) + 4)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert report["trainable_params"] == report["adapter_params"] + head


def test_target_selection_modes(tiny_bert):
    from geolora.model import find_target_names

    regex = find_target_names(tiny_bert, GeoLoRAConfig(target_modules=r".*layer\.0\..*query"))
    assert regex == ["bert.encoder.layer.0.attention.self.query"]
    all_linear = find_target_names(
        tiny_bert, GeoLoRAConfig(target_modules="all-linear", modules_to_save=["classifier"])
    )
    assert "classifier" not in all_linear and len(all_linear) == 2 * 6 + 1  # + pooler.dense
    excluded = find_target_names(
        tiny_bert, GeoLoRAConfig(target_modules=["dense"], exclude_modules=["pooler.dense"])
    )
    assert "bert.pooler.dense" not in excluded and len(excluded) == 2 * 3


def test_unknown_target_lists_close_names(tiny_bert):
    with pytest.raises(ValueError, match=r"'quary'.*query"):
        get_geolora_model(tiny_bert, GeoLoRAConfig(target_modules=["quary", "value"]))


def test_unsupported_layer_type_is_named(tiny_bert):
    with pytest.raises(TypeError, match=r"LayerNorm.*Remove it from target_modules"):
        get_geolora_model(tiny_bert, GeoLoRAConfig(target_modules=["attention.output.LayerNorm"]))


def test_grouped_conv_refused():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match="groups=1"):
        get_geolora_model(net, GeoLoRAConfig(target_modules=["0"], r=1))


def test_rank_larger_than_layer_is_capped_per_module():
    """A 3-output head under r=4, r_min=4 gets rank 3 = min(n, m); the wide layer keeps r=4."""
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    get_geolora_model(net, GeoLoRAConfig(target_modules="all-linear", r=4, r_min=4))
    assert (net[0].current_rank, net[0].r_max, net[0].r_min) == (4, 8, 4)
    assert (net[1].current_rank, net[1].r_max, net[1].r_min) == (3, 3, 3)


def test_double_injection_refused(tiny_bert):
    get_geolora_model(tiny_bert, GeoLoRAConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="already has GeoLoRA"):
        get_geolora_model(tiny_bert, GeoLoRAConfig(target_modules=["value"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau": 1.0}, "tau must lie in"),
        ({"tau": -0.1}, "tau must lie in"),
        ({"shrinkage": 1.0}, "shrinkage must lie in"),
        ({"shrinkage": -0.01}, "shrinkage must lie in"),
        ({"rank_margin": 1.5}, "rank_margin must lie in"),
        ({"r": 16, "r_max": 8}, "larger than r_max"),
        ({"r": 0}, "positive integer"),
        ({"r_min": 4, "r": 2}, "larger than r="),
        ({"truncation": "weird"}, "truncation must be"),
        ({"budget": 0}, "budget must be"),
        ({"target_modules": []}, "needs target_modules"),
    ],
)
def test_config_validation(kwargs, message):
    base = {"target_modules": ["query"]}
    with pytest.raises(ValueError, match=message):
        GeoLoRAConfig(**{**base, **kwargs})


def test_config_round_trip():
    cfg = GeoLoRAConfig(target_modules=["q"], r=3, r_max=9, tau=0.2, budget=40)
    assert GeoLoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown GeoLoRAConfig keys"):
        GeoLoRAConfig.from_dict({**cfg.to_dict(), "rank": 3})


def test_modules_inside_a_saved_module_get_no_adapter():
    net = nn.Sequential()
    net.add_module("body", nn.Linear(6, 6))
    head = nn.Sequential()
    head.add_module("classifier", nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)))
    net.add_module("head", head)
    cfg = GeoLoRAConfig(target_modules="all-linear", r=2, modules_to_save=["classifier"])
    get_geolora_model(net, cfg)
    assert isinstance(net.body, GeoLoRALinear)
    assert not any(isinstance(m, GeoLoRALinear) for m in net.head.modules())
    assert all(p.requires_grad for p in net.head.parameters())


def test_deepcopied_model_keeps_factor_marks(tiny_bert):
    import copy

    from geolora import GeoLoRAOptimizer
    from geolora.layers import is_factor

    model = get_geolora_model(tiny_bert, GeoLoRAConfig(target_modules=["query"]))
    clone = copy.deepcopy(model)
    layer = clone.bert.encoder.layer[0].attention.self.query
    assert all(is_factor(p) for p in (layer.U, layer.S, layer.V))
    GeoLoRAOptimizer(clone, lr=1e-3)  # factors are told apart from the head again
