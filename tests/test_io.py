"""save_adapter / load_adapter: round trip, atomic save, and every way a load must be refused."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import tiny_bert_config
from safetensors.torch import load_file, save_file

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, geolora_layers, get_geolora_model
from geolora.formats import _files as gio
from geolora.io import AdapterError, load_adapter, save_adapter

BERT_CFG = dict(
    target_modules=["query", "value", "dense"],
    r=2,
    r_max=8,
    tau=0.2,
    lora_alpha=4,
    modules_to_save=["classifier"],
)


def _train(model, steps: int, vocab: int = 64) -> None:
    opt = GeoLoRAOptimizer(model, lr=0.05)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (8, 12))
        out = model(
            input_ids=ids, labels=ids if model.config.model_type == "gpt2" else ids[:, 0] % 2
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def _logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def trained(tiny_bert):
    """(trained GeoLoRA BERT, untouched copy of its base)."""
    tiny_bert.config._name_or_path = "tiny/bert"
    base = copy.deepcopy(tiny_bert)
    model = get_geolora_model(tiny_bert, GeoLoRAConfig(**BERT_CFG))
    _train(model, 3)
    return model.eval(), base


def test_round_trip_stores_only_active_factors(trained, tmp_path):
    model, base = trained
    ranks = {name: layer.current_rank for name, layer in geolora_layers(model).items()}
    assert len(set(ranks.values())) > 1, "test needs different ranks per module"
    path = save_adapter(model, tmp_path / "adapter")
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["ranks"] == ranks and meta["base_model_name_or_path"] == "tiny/bert"
    assert meta["scale"] == model.geolora_config.scale == 2.0
    assert meta["geolora_version"] and meta["format_version"] == 1
    tensors = load_file(path / "adapter_model.safetensors")
    for name, layer in geolora_layers(model).items():
        r = ranks[name]
        assert tensors[f"{name}.U"].shape == (layer.out_features, r)
        assert tensors[f"{name}.S"].shape == (r,)
        assert tensors[f"{name}.V"].shape == (layer.in_features, r)
    assert torch.equal(tensors["classifier.weight"], model.classifier.weight)

    loaded = load_adapter(base, path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert {n: la.current_rank for n, la in geolora_layers(loaded).items()} == ranks
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="already has GeoLoRA adapters"):
        load_adapter(loaded, path)


def test_trainable_load_resumes_training(trained, tmp_path):
    model, base = trained
    loaded = load_adapter(base, save_adapter(model, tmp_path / "a"), is_trainable=True)
    layer = next(iter(geolora_layers(loaded).values()))
    assert layer.U.requires_grad and loaded.classifier.weight.requires_grad
    assert not layer.base_layer.weight.requires_grad
    before = layer.delta_weight().detach().clone()
    _train(loaded, 1)
    assert not torch.allclose(layer.delta_weight(), before)


def test_gpt2_conv1d_and_full_s_round_trip(tiny_gpt2, tmp_path):
    base = copy.deepcopy(tiny_gpt2)
    model = get_geolora_model(tiny_gpt2, GeoLoRAConfig(target_modules=["c_attn", "c_fc"], r=3))
    _train(model, 2)
    layer = geolora_layers(model)["transformer.h.0.attn.c_attn"]
    s_full = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.3, 0.0], [0.0, 0.0, 0.1]])
    u, v = (torch.linalg.qr(torch.randn(n, 3)).Q for n in (layer.out_features, 32))
    layer.set_factors(u, s_full, v)
    path = save_adapter(model, tmp_path / "gpt2")
    tensors = load_file(path / "adapter_model.safetensors")
    assert tensors["transformer.h.1.attn.c_attn.S"].dim() == 1
    assert torch.equal(tensors["transformer.h.0.attn.c_attn.S"], s_full)
    loaded = load_adapter(base, path)
    torch.testing.assert_close(_logits(loaded), _logits(model.eval()), rtol=0, atol=1e-6)


def _snapshot(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_crash_between_file_writes_keeps_previous(trained, tmp_path, monkeypatch):
    model, base = trained
    path = save_adapter(model, tmp_path / "a")
    first, expected = _snapshot(path), _logits(model)
    _train(model.train(), 1)
    real_write, calls = gio._write, []

    def failing_write(file, data):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_write(file, data)

    monkeypatch.setattr(gio, "_write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(model, path)
    assert _snapshot(path) == first
    torch.testing.assert_close(_logits(load_adapter(base, path)), expected, rtol=0, atol=1e-6)


def test_crash_between_renames_recovers_previous(trained, tmp_path, monkeypatch):
    model, base = trained
    path = save_adapter(model, tmp_path / "a")
    first = _snapshot(path)
    _train(model.train(), 1)
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("killed (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(model, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not path.exists()  # the state a killed process leaves: old adapter in the backup
    load_adapter(copy.deepcopy(base), path)
    assert _snapshot(path) == first
    save_adapter(model, path)  # a later save still works and leaves no stray siblings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    torch.testing.assert_close(
        _logits(load_adapter(base, path)), _logits(model.eval()), rtol=0, atol=1e-6
    )


def test_save_refuses_directory_with_other_files(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_adapter(trained[0], tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.fixture
def saved(trained, tmp_path):
    model, base = trained
    return save_adapter(model, tmp_path / "a"), base


def _edit_config(path, **changes):
    file = path / "adapter_config.json"
    meta = json.loads(file.read_text())
    meta.update(changes)
    file.write_text(json.dumps(meta))


def _refused(base, path, match):
    with pytest.raises((AdapterError, FileNotFoundError), match=match):
        load_adapter(base, path)
    assert not geolora_layers(base), "a refused load must leave the base model untouched"


def test_truncated_and_corrupt_tensor_file(saved):
    path, base = saved
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _refused(base, path, "corrupt or truncated")
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # damaged tensor data, header intact
    _refused(base, path, "SHA-256")
    file.unlink()
    _refused(base, path, "adapter_model.safetensors not found")


def test_unreadable_or_inconsistent_config(saved):
    path, base = saved
    file = path / "adapter_config.json"
    good = file.read_text()
    file.write_text(good[:40])
    _refused(base, path, "not valid JSON")
    file.write_text(good)
    name = "bert.encoder.layer.0.attention.self.query"
    ranks = json.loads(good)["ranks"]
    _edit_config(path, ranks={**ranks, name: ranks[name] + 1})
    _refused(base, path, f"'{name}'.*records rank {ranks[name] + 1}")
    file.write_text(good)
    _edit_config(path, scale=3.0)
    _refused(base, path, "records scale 3.0")
    file.write_text(good)
    _edit_config(path, format_version=99)
    _refused(base, path, "upgrade geolora")
    file.write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    _refused(base, path, "geolora_from_peft")


def test_missing_and_extra_tensors(saved):
    path, base = saved
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    del tensors["bert.pooler.dense.V"]
    tensors["bert.pooler.dense.W"] = torch.zeros(2)
    save_file(tensors, file)
    _refused(base, path, r"missing tensors \['bert.pooler.dense.V'\].*\['bert.pooler.dense.W'\]")


def test_base_model_with_other_shapes(saved):
    from transformers import BertForSequenceClassification

    path, _ = saved
    other = BertForSequenceClassification(tiny_bert_config(intermediate_size=40))
    _refused(other, path, r"'bert.encoder.layer.0.intermediate.dense'.*\(48, 32\).*\(40, 32\)")
    other = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    _refused(other, path, r"'classifier.weight'.*\(2, 32\).*\(3, 32\)")
    other = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=1))
    _refused(other, path, r"bert.encoder.layer.1")
