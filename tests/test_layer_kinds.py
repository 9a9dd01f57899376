"""Layer kinds: every kind's forward equals the base layer with ``W0 + ΔW`` and its backward
gives ``G_K = s G V``, ``G_L = s Gᵀ U``, ``G_S = s Uᵀ G V``; wrapped layers behave like the
layers they wrap (T5, ViT, nn.TransformerEncoder, BERT, Llama); owners that read weights."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_config
from torch import nn
from torch.func import functional_call

from geolora import GeoLoRAConfig, get_geolora_model
from geolora.layers import GeoLoRAConv1d, GeoLoRAConv2d, GeoLoRAEmbedding, GeoLoRALinear


def _randomise(layer, gen):
    r = layer.current_rank
    with torch.no_grad():
        layer.S[:r, :r] = torch.randn(r, r, generator=gen, dtype=layer.S.dtype)


def _check_forward_and_gradients(layer, x):
    """Forward = base layer with W0 + ΔW; factor grads = s G V, s Gᵀ U, s Uᵀ G V."""
    _randomise(layer, torch.Generator().manual_seed(1))
    y = layer(x)
    dy = torch.randn_like(y)
    layer.zero_grad()
    (y * dy).sum().backward()
    d = torch.zeros(layer.out_features, layer.in_features, dtype=layer.U.dtype).requires_grad_()
    w0 = layer.base_layer.weight.detach()
    w = w0 + layer.to_weight_layout(layer.delta_weight().detach() + d).to(w0.dtype)
    params = {"weight": w}
    if getattr(layer.base_layer, "bias", None) is not None:
        params["bias"] = layer.base_layer.bias.detach()
    dense = functional_call(layer.base_layer, params, (x,))
    torch.testing.assert_close(y, dense)
    (dense * dy).sum().backward()
    g, s = d.grad, layer.scale
    u, _, v = (t.detach() for t in layer.active_factors())
    r = layer.current_rank
    torch.testing.assert_close(layer.U.grad[:, :r], s * g @ v)
    torch.testing.assert_close(layer.V.grad[:, :r], s * g.t() @ u)
    torch.testing.assert_close(layer.S.grad[:r, :r], s * u.t() @ g @ v)


CONVS = [
    (nn.Conv1d(3, 5, 3, padding="same"), (2, 3, 9)),
    (nn.Conv1d(3, 5, 4, padding="same", dilation=2), (2, 3, 11)),  # uneven "same"
    (nn.Conv1d(3, 5, 3, padding="valid", stride=2), (2, 3, 10)),
    (nn.Conv2d(3, 4, (2, 3), padding="same"), (2, 3, 6, 7)),  # uneven in one dimension
    (nn.Conv2d(3, 4, 3, padding="valid"), (2, 3, 6, 6)),
    (nn.Conv2d(3, 4, 3, padding=(1, 2), stride=2, dilation=2), (2, 3, 9, 9)),
]


@pytest.mark.parametrize("conv, shape", CONVS, ids=lambda c: str(c).replace(" ", ""))
def test_convolutions_forward_and_backward(conv, shape):
    torch.set_default_dtype(torch.float64)
    try:
        net = nn.Sequential(conv.double())
        get_geolora_model(net, GeoLoRAConfig(target_modules=["0"], r=2, r_max=4, lora_alpha=3))
        assert isinstance(net[0], (GeoLoRAConv1d, GeoLoRAConv2d))
        x = torch.randn(*shape).requires_grad_()
        _check_forward_and_gradients(net[0], x)
        assert net[0].padding == conv.padding and net[0].kernel_size == conv.kernel_size
        unbatched = x[0].detach()
        torch.testing.assert_close(net(unbatched), net(unbatched[None])[0])
    finally:
        torch.set_default_dtype(torch.float32)


def test_embedding_forward_backward_and_padding_row():
    torch.set_default_dtype(torch.float64)
    try:
        net = nn.Sequential(nn.Embedding(11, 6, padding_idx=0))
        get_geolora_model(net, GeoLoRAConfig(target_modules=["0"], r=3, lora_alpha=5))
        layer = net[0]
        assert isinstance(layer, GeoLoRAEmbedding)
        assert (layer.out_features, layer.in_features) == (6, 11)
        assert layer.num_embeddings == 11 and layer.padding_idx == 0
        ids = torch.tensor([[1, 4, 0, 4], [10, 0, 3, 2]])
        _check_forward_and_gradients(layer, ids)
        assert torch.count_nonzero(layer.V.grad[0]) == 0  # padding row gets no gradient
    finally:
        torch.set_default_dtype(torch.float32)


def test_refused_kinds_name_the_module():
    with pytest.raises(TypeError, match="'0' is an nn.Embedding with max_norm"):
        get_geolora_model(
            nn.Sequential(nn.Embedding(5, 4, max_norm=1.0)), GeoLoRAConfig(target_modules=["0"])
        )
    with pytest.raises(TypeError, match="'0' is a convolution with padding_mode='reflect'"):
        conv = nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect")
        get_geolora_model(nn.Sequential(conv), GeoLoRAConfig(target_modules=["0"], r=1))
    with pytest.raises(TypeError, match="'0' is a LayerNorm.*supported are nn.Linear"):
        get_geolora_model(nn.Sequential(nn.LayerNorm(4)), GeoLoRAConfig(target_modules=["0"]))


def _encoder():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_transformer_encoder_all_linear_leaves_out_mha_out_proj():
    model = _encoder()
    get_geolora_model(model, GeoLoRAConfig(target_modules="all-linear", r=2))
    names = {n for n, m in model.named_modules() if isinstance(m, GeoLoRALinear)}
    assert names == {f"layers.{i}.{leaf}" for i in range(2) for leaf in ("linear1", "linear2")}


def test_weight_reading_owners_apply_the_adapter_on_every_route():
    """MHA reads out_proj.weight; TransformerEncoderLayer's no-grad fast path reads linear1/2's
    weights: both see W0 + ΔW, train mode and the fast path agree with the merged model, and the
    weight route gives the same three gradients."""
    torch.manual_seed(0)
    model = _encoder()
    get_geolora_model(model, GeoLoRAConfig(target_modules=["out_proj", "linear1", "linear2"], r=2))
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, GeoLoRALinear):
            assert m.reads_weight
            _randomise(m, gen)
    x = torch.randn(2, 5, 16)
    trained = model.train()(x)
    with torch.no_grad():
        fast = model.eval()(x)
    import copy

    from geolora import merge_and_unload

    merged = merge_and_unload(copy.deepcopy(model)).eval()
    with torch.no_grad():
        reference = merged(x)
    torch.testing.assert_close(trained.detach(), reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    assert (fast - model.layers[0].self_attn(x, x, x)[0]).abs().max() > 0  # not the base only

    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    holder = nn.Sequential()
    holder.add_module("attn", mha)
    get_geolora_model(holder, GeoLoRAConfig(target_modules=["out_proj"], r=2, lora_alpha=3))
    layer = mha.out_proj
    _randomise(layer, gen)
    q = torch.randn(2, 4, 8, dtype=torch.float64)
    y = mha(q, q, q, need_weights=False)[0]
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    d = torch.zeros(8, 8, dtype=torch.float64, requires_grad=True)
    w = layer.base_layer.weight.detach() + layer.delta_weight().detach() + d
    dense = nn.functional.multi_head_attention_forward(
        q.transpose(0, 1), q.transpose(0, 1), q.transpose(0, 1), 8, 2,
        mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0, w, layer.bias,
        need_weights=False,
    )[0].transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(y, dense)
    (dense * dy).sum().backward()
    u, _, v = (t.detach() for t in layer.active_factors())
    torch.testing.assert_close(layer.U.grad[:, :2], layer.scale * d.grad @ v)
    torch.testing.assert_close(layer.V.grad[:, :2], layer.scale * d.grad.t() @ u)


def test_t5_all_linear_runs_and_reads_wo_weight():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
        decoder_start_token_id=0, dropout_rate=0.0,
    )  # fmt: skip
    model = T5ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 32, (2, 6))
    before = model(input_ids=ids, decoder_input_ids=ids).logits
    get_geolora_model(model, GeoLoRAConfig(target_modules="all-linear", r=2))
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, GeoLoRALinear) and wo.weight is wo.base_layer.weight
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, before)


def test_vit_patch_projection_is_a_conv2d_adapter():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=24, num_labels=3,
    )  # fmt: skip
    model = ViTForImageClassification(config).eval()
    cfg = GeoLoRAConfig(target_modules=["projection"], r=2)
    get_geolora_model(model, cfg)
    proj = model.vit.embeddings.patch_embeddings.projection
    assert isinstance(proj, GeoLoRAConv2d) and proj.weight.shape == (16, 3, 4, 4)
    _randomise(proj, torch.Generator().manual_seed(0))
    pixels = torch.randn(2, 3, 8, 8)
    out = model(pixel_values=pixels).logits
    out.sum().backward()
    assert proj.U.grad is not None and out.shape == (2, 3)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_wrapped_layers_expose_base_attributes(family):
    if family == "bert":
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification(tiny_bert_config())
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=48,
                hidden_size=16,
                intermediate_size=24,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=32,
            )  # fmt: skip
        )
    get_geolora_model(model, GeoLoRAConfig(target_modules="all-linear", r=4))
    layers = [m for m in model.modules() if isinstance(m, GeoLoRALinear)]
    assert layers
    for layer in layers:
        base = layer.base_layer
        assert layer.weight is base.weight and layer.bias is base.bias
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)
    heads = [m for m in layers if min(m.out_features, m.in_features) < 4]
    assert all(m.current_rank == min(m.out_features, m.in_features) for m in heads)
    if family == "bert":
        assert heads and model.classifier in heads  # a 2-output head, capped instead of refused
    ids = torch.randint(0, 48, (2, 7))
    model(input_ids=ids).logits.sum().backward()


def test_peft_model_is_pointed_to_geolora_from_peft(tiny_gpt2):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_gpt2, LoraConfig(target_modules=["c_attn"], r=2))
    with pytest.raises(TypeError, match="geolora_from_peft"):
        get_geolora_model(peft_model, GeoLoRAConfig(target_modules=["c_attn"]))


def test_merge_embedding_and_conv1d_keeps_outputs():
    import copy

    from geolora import merge_and_unload

    net = nn.Sequential(nn.Embedding(9, 4, padding_idx=2), nn.Conv1d(5, 3, 4, padding="same"))
    get_geolora_model(net, GeoLoRAConfig(target_modules=["0", "1"], r=2))
    gen = torch.Generator().manual_seed(7)
    for layer in (net[0], net[1]):
        _randomise(layer, gen)
    ids, signal = torch.tensor([[2, 0, 8, 2]]), torch.randn(2, 5, 9)
    emb, conv = net[0](ids), net[1](signal)
    assert torch.equal(emb[0, 0], net[0].base_layer.weight[2])  # padding row not adapted
    merged = merge_and_unload(copy.deepcopy(net))
    torch.testing.assert_close(merged[0](ids), emb)
    torch.testing.assert_close(merged[1](signal), conv)
