"""Every save path keeps the adapter, and every export is read right by its consumer: GeoLoRA
format through save_pretrained, peft (AutoPeftModelFor*), the serving layout under the scale
rules of peft, vLLM, TGI and llama.cpp, and diffusers (UNet2DConditionModel)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_bert_config
from safetensors.torch import load_file
from torch import nn

from geolora import (
    GeoLoRAConfig,
    export_diffusers_lora,
    export_peft_lora,
    geolora_from_peft,
    geolora_layers,
    get_geolora_model,
    load_adapter,
)


def _randomise(model, seed=0, ranks=None):
    """Random orthonormal factors and singular values, each layer at its own rank."""
    gen = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(geolora_layers(model).values()):
        r = min(layer.r_max, ranks[i % len(ranks)]) if ranks else layer.current_rank
        u = torch.linalg.qr(torch.randn(layer.out_features, r, generator=gen)).Q
        v = torch.linalg.qr(torch.randn(layer.in_features, r, generator=gen)).Q
        layer.set_factors(u, torch.rand(r, generator=gen) + 0.5, v)
    return model


def _tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    return lambda: LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()


def test_save_pretrained_writes_the_adapter_and_peft_loaders_name_the_right_call(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    BertForSequenceClassification(tiny_bert_config()).save_pretrained(tmp_path / "base")
    load_base = lambda: BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()  # noqa: E731
    cfg = GeoLoRAConfig(target_modules=["query", "value"], r=2, modules_to_save=["classifier"])
    model = _randomise(get_geolora_model(load_base(), cfg))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    ids = torch.randint(0, 64, (2, 9))
    reloaded = load_adapter(load_base(), tmp_path / "out")
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(KeyError, match=r"geolora\.load_adapter\(base_model, path\)"):
        PeftModel.from_pretrained(load_base(), str(tmp_path / "out"))
    with pytest.raises(KeyError, match=r"geolora\.load_adapter"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")


def test_merge_and_unload_gives_back_the_plain_save_pretrained(tiny_bert, tmp_path):
    from geolora import merge_and_unload

    model = _randomise(get_geolora_model(tiny_bert, GeoLoRAConfig(["query"], r=2)))
    plain = merge_and_unload(model)
    assert "save_pretrained" not in vars(plain) and "print_trainable_parameters" not in vars(plain)
    plain.save_pretrained(tmp_path / "merged")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "merged").iterdir()}


def test_print_trainable_parameters(tiny_bert, capsys):
    model = get_geolora_model(tiny_bert, GeoLoRAConfig(target_modules=["query"], r=2))
    model.print_trainable_parameters()
    adapters = 2 * 2 * (32 + 32) + 2 * 2  # two layers at rank 2: r (n + m) + r
    total = sum(p.numel() for n, p in model.named_parameters() if n[-2:] not in (".U", ".S", ".V"))
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {adapters:,d} || all params: {total + adapters:,d} || "
        f"trainable%: {100 * adapters / (total + adapters):.4f}"
    )


def test_task_type_is_validated():
    from peft import TaskType

    assert (
        GeoLoRAConfig(target_modules=["q"], task_type=TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"
    )
    with pytest.raises(ValueError, match="task_type must be one of"):
        GeoLoRAConfig(target_modules=["q"], task_type="CLASSIFY")


def test_auto_peft_models_load_the_export(tmp_path):
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import BertForSequenceClassification

    load_llama = _tiny_llama(tmp_path)
    llama = _randomise(get_geolora_model(load_llama(), GeoLoRAConfig("all-linear", r=3)), 1)
    export_peft_lora(llama, tmp_path / "llama-peft")
    meta = json.loads((tmp_path / "llama-peft" / "adapter_config.json").read_text())
    assert meta["task_type"] == "CAUSAL_LM"
    assert meta["base_model_name_or_path"] == str(tmp_path / "llama")
    ids = torch.randint(0, 48, (2, 7))
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "llama-peft").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, llama(input_ids=ids).logits)

    BertForSequenceClassification(tiny_bert_config(num_labels=3)).save_pretrained(tmp_path / "b")
    bert = BertForSequenceClassification.from_pretrained(tmp_path / "b").eval()
    cfg = GeoLoRAConfig(["query", "value"], r=2, modules_to_save=["classifier"])
    bert = _randomise(get_geolora_model(bert, cfg), 2)
    with torch.no_grad():
        bert.classifier.weight.mul_(3.0)
    export_peft_lora(bert, tmp_path / "bert-peft")
    assert (
        json.loads((tmp_path / "bert-peft" / "adapter_config.json").read_text())["task_type"]
        == "SEQ_CLS"
    )
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "bert-peft").eval()
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(loaded(input_ids=ids).logits, bert(input_ids=ids).logits)


def test_auto_peft_model_loads_a_model_without_task(tmp_path):
    """No task (a bare BertModel): ``auto_mapping`` names the class for ``AutoPeftModel``."""
    from peft import AutoPeftModel
    from transformers import BertModel

    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "bare")
    model = BertModel.from_pretrained(tmp_path / "bare").eval()
    model = _randomise(get_geolora_model(model, GeoLoRAConfig(["query", "value"], r=2)), 7)
    export_peft_lora(model, tmp_path / "peft")
    loaded = AutoPeftModel.from_pretrained(tmp_path / "peft").eval()
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(
        loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
    )


def test_exports_refuse_layers_whose_owner_reads_the_weight(tmp_path):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, batch_first=True)
    model = get_geolora_model(nn.Sequential(layer), GeoLoRAConfig(["out_proj"], r=2))
    with pytest.raises(ValueError, match="reads out_proj.weight directly.*merge_and_unload"):
        export_peft_lora(model, tmp_path / "peft")
    with pytest.raises(ValueError, match="reads out_proj.weight directly"):
        export_diffusers_lora(model, tmp_path / "diffusers")


def _consumer_deltas(path):
    """ΔW per module as each consumer computes it from the exported files (module doc of
    geolora.formats.peft cites the source of every rule)."""
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    rules = {
        # peft: per module lora_alpha / r, with alpha_pattern / rank_pattern by name suffix
        "peft": lambda name, b: (
            config["alpha_pattern"].get(name, config["lora_alpha"])
            / config["rank_pattern"].get(name, config["r"])
        ),
        # vLLM PEFTHelper: one lora_alpha / r, patterns ignored
        "vllm": lambda name, b: config["lora_alpha"] / config["r"],
        # TGI LoraWeights.prepare_weights: one lora_alpha / r folded into B
        "tgi": lambda name, b: config["lora_alpha"] / config["r"],
        # llama.cpp: global lora_alpha over the rank read off B's shape
        "llama.cpp": lambda name, b: config["lora_alpha"] / b.shape[1],
    }
    deltas = {}
    for consumer, scale in rules.items():
        for name in names:
            a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
            short = name.removeprefix("base_model.model.")
            deltas[consumer, short] = scale(short, b) * (b @ a)
    return deltas, tensors


def test_serving_export_is_read_alike_by_peft_vllm_tgi_and_llama_cpp(tmp_path):
    from peft import PeftModel

    load_llama = _tiny_llama(tmp_path)
    model = get_geolora_model(load_llama(), GeoLoRAConfig("all-linear", r=3, r_max=6))
    _randomise(model, 3, ranks=[1, 2, 5, 3])
    layers = geolora_layers(model)
    assert len({layer.current_rank for layer in layers.values()}) > 1
    export_peft_lora(model, tmp_path / "train")
    export_peft_lora(model, tmp_path / "serve", for_serving=True)
    train, _ = _consumer_deltas(tmp_path / "train")
    serve, tensors = _consumer_deltas(tmp_path / "serve")
    for name, layer in layers.items():
        want = layer.delta_weight().detach()
        for consumer in ("peft", "vllm", "tgi", "llama.cpp"):
            torch.testing.assert_close(serve[consumer, name], want, msg=f"{consumer} {name}")
        torch.testing.assert_close(train["peft", name], want)
    # why the serving layout exists: llama.cpp scales the rank-patterned export by alpha / r_i
    wrong = [
        n for n in layers if not torch.allclose(train["llama.cpp", n], layers[n].delta_weight())
    ]
    assert wrong
    assert len({t.shape[0] for k, t in tensors.items() if "lora_A" in k}) == 1  # TGI stacks
    ids = torch.randint(0, 48, (2, 7))
    peft_model = PeftModel.from_pretrained(load_llama(), str(tmp_path / "serve")).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits)


class _EmbedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6, padding_idx=1)
        self.conv = nn.Conv1d(6, 5, 3, padding="same")
        self.head = nn.Linear(5, 2)

    def forward(self, ids):
        return self.head(self.conv(self.embed(ids).transpose(1, 2)).mean(-1))


def test_embedding_and_conv1d_round_trip_through_peft(tmp_path):
    from peft import PeftModel

    base = _EmbedConv().eval()
    model = get_geolora_model(copy.deepcopy(base), GeoLoRAConfig(["embed", "conv"], r=3))
    _randomise(model, 4)
    ids = torch.tensor([[1, 3, 7, 1, 19], [4, 4, 0, 2, 1]])
    expected = model(ids)
    export_peft_lora(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(peft_model(ids), expected)
    back = geolora_from_peft(peft_model).eval()
    torch.testing.assert_close(back(ids), expected)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip


def test_diffusers_export_loads_with_equal_outputs(tmp_path):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    base = _tiny_unet()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv1"]
    model = get_geolora_model(copy.deepcopy(base), GeoLoRAConfig(targets, r=2, r_max=4))
    _randomise(model, 5, ranks=[1, 3, 2])
    sample, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    context = torch.randn(1, 3, 8)
    with torch.no_grad():
        expected = model(sample, t, encoder_hidden_states=context).sample
    export_diffusers_lora(model, tmp_path / "lora")
    unet = copy.deepcopy(base)
    unet.load_lora_adapter(str(tmp_path / "lora"), prefix="unet", use_safetensors=True)
    with torch.no_grad():
        got = unet(sample, t, encoder_hidden_states=context).sample
        plain = base(sample, t, encoder_hidden_states=context).sample
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_diffusers_pipeline_load_lora_weights(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    base = _tiny_unet()
    model = get_geolora_model(copy.deepcopy(base), GeoLoRAConfig(["to_q", "conv_in"], r=2))
    _randomise(model, 6, ranks=[1, 2])
    export_diffusers_lora(model, tmp_path / "lora")
    vae = AutoencoderKL(
        latent_channels=4, block_out_channels=(8,), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=copy.deepcopy(base),
        scheduler=DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.load_lora_weights(str(tmp_path / "lora"))
    sample, t, context = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 3, 8)
    with torch.no_grad():
        got = pipe.unet(sample, t, encoder_hidden_states=context).sample
        expected = model(sample, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
