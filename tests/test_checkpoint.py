"""Training checkpoints: exact resume, validation against the model, atomic writes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model
from geolora.checkpoint import load_training_checkpoint, save_training_checkpoint
from geolora.model import geolora_layers

N_FIRST, N_MORE = 4, 4
RULES = [
    dict(base_rule="adam", lr=2e-2),
    dict(base_rule="riemannian_adam_rows", lr=2e-2),
    dict(base_rule="riemannian_adam_features", lr=2e-2),
    dict(base_rule="sgd", momentum=0.9, lr=0.5, other_lr=1e-3),
]


def build(targets=("query", "value"), r_max=8, adapter_seed=0):
    """Same base weights for every call; the adapters' random init depends on ``adapter_seed``.
    Dropout is on, so the RNG state matters."""
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.1))
    torch.manual_seed(adapter_seed)
    cfg = GeoLoRAConfig(
        target_modules=list(targets),
        r=2,
        r_max=r_max,
        tau=0.05,
        lora_dropout=0.1,
        modules_to_save=["classifier"],
    )
    return get_geolora_model(base, cfg).train()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        dict(
            input_ids=torch.randint(0, 64, (8, 12), generator=g),
            labels=torch.randint(0, 2, (8,), generator=g),
        )
        for _ in range(n)
    ]


def train(model, opt, data):
    ranks = []
    for batch in data:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        ranks.append(tuple(layer.current_rank for layer in geolora_layers(model).values()))
    return ranks


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.mark.parametrize(
    "rule", RULES, ids=["adam", "riemannian_adam_rows", "riemannian_adam_features", "sgd-momentum"]
)
def test_resume_continues_exactly_like_the_uninterrupted_run(tmp_path, rule):
    data = batches(N_FIRST + N_MORE)
    model_a = build()
    opt_a = GeoLoRAOptimizer(model_a, **rule)
    ranks = train(model_a, opt_a, data[:N_FIRST])
    path = save_training_checkpoint(tmp_path / "ckpt.pt", model_a, opt_a, step=N_FIRST)
    ranks += train(model_a, opt_a, data[N_FIRST:])
    assert len(set(ranks)) > 1, "ranks never changed: the test would not exercise transport"

    model_b = build(adapter_seed=123)  # everything trainable must come from the file
    opt_b = GeoLoRAOptimizer(model_b, **rule)
    info = load_training_checkpoint(path, model_b, opt_b)
    assert info == {"step": N_FIRST, "extra": {}}
    assert opt_b.param_groups[0]["steps"] == N_FIRST
    train(model_b, opt_b, data[N_FIRST:])
    assert_close(trainable(model_a), trainable(model_b), atol=1e-6)
    assert [layer.current_rank for layer in geolora_layers(model_b).values()] == list(ranks[-1])

    # the optimizer state matters: resuming with a fresh optimizer ends elsewhere
    model_c = build()
    load_training_checkpoint(path, model_c, GeoLoRAOptimizer(model_c, **rule))
    train(model_c, GeoLoRAOptimizer(model_c, **rule), data[N_FIRST:])
    diff = max(
        (p - q).abs().max().item()
        for p, q in zip(trainable(model_a).values(), trainable(model_c).values())
    )
    assert diff > 1e-4


def test_rng_state_is_restored(tmp_path):
    model = build()
    opt = GeoLoRAOptimizer(model)
    path = save_training_checkpoint(tmp_path / "c.pt", model, opt, step=0)
    expected = torch.rand(5)
    load_training_checkpoint(path, model, opt)
    assert torch.equal(torch.rand(5), expected)


def test_extra_round_trips_and_must_be_plain_data(tmp_path):
    model = build()
    opt = GeoLoRAOptimizer(model)
    extra = {"scheduler": {"last_epoch": 3, "lrs": [0.1, 0.2]}, "t": torch.arange(3)}
    path = save_training_checkpoint(tmp_path / "c.pt", model, opt, step=7, extra=extra)
    out = load_training_checkpoint(path, model, opt)
    assert out["step"] == 7 and out["extra"]["scheduler"] == extra["scheduler"]
    assert torch.equal(out["extra"]["t"], extra["t"])
    with pytest.raises(TypeError, match=r"extra\['obj'\] is a object"):
        save_training_checkpoint(tmp_path / "d.pt", model, opt, step=0, extra={"obj": object()})
    with pytest.raises(ValueError, match="step"):
        save_training_checkpoint(tmp_path / "d.pt", model, opt, step=-1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=("query", "key")), "adapters missing from the model: .*value"),
        (dict(r_max=4), r"\(out, in, r_max\) = \(32, 32, 4\) here but \(32, 32, 8\)"),
    ],
)
def test_load_names_what_does_not_match(tmp_path, kwargs, message):
    model = build()
    path = save_training_checkpoint(tmp_path / "c.pt", model, GeoLoRAOptimizer(model), step=1)
    other = build(**kwargs)
    before = trainable(other)
    with pytest.raises(ValueError, match=message):
        load_training_checkpoint(path, other, GeoLoRAOptimizer(other))
    assert_close(before, trainable(other), atol=0)


def test_load_rejects_extra_trainable_parameters(tmp_path):
    model = build()
    path = save_training_checkpoint(tmp_path / "c.pt", model, GeoLoRAOptimizer(model), step=1)
    other = build()
    other.bert.pooler.dense.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="not in the checkpoint: bert.pooler.dense.weight"):
        load_training_checkpoint(path, other, GeoLoRAOptimizer(other))


def test_load_rejects_an_optimizer_built_differently(tmp_path):
    model = build()
    path = save_training_checkpoint(tmp_path / "c.pt", model, GeoLoRAOptimizer(model), step=1)
    other = build(adapter_seed=5)
    before = trainable(other)
    plain = torch.optim.SGD([next(other.parameters())], lr=0.1)
    with pytest.raises(ValueError, match="optimizer state .* does not fit"):
        load_training_checkpoint(path, other, plain)
    assert_close(before, trainable(other), atol=0)  # rolled back


def test_truncated_or_foreign_files_give_clear_errors(tmp_path):
    model = build()
    opt = GeoLoRAOptimizer(model)
    path = save_training_checkpoint(tmp_path / "c.pt", model, opt, step=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_training_checkpoint(path, model, opt)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a GeoLoRA training checkpoint"):
        load_training_checkpoint(tmp_path / "foreign.pt", model, opt)
    with pytest.raises(FileNotFoundError):
        load_training_checkpoint(tmp_path / "missing.pt", model, opt)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = build()
    opt = GeoLoRAOptimizer(model)
    path = save_training_checkpoint(tmp_path / "c.pt", model, opt, step=1)
    good = path.read_bytes()

    def crash(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(path, model, opt, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    assert load_training_checkpoint(path, model, opt)["step"] == 1
