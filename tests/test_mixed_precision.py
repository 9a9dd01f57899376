"""Mixed precision and activation checkpointing.

* bf16 autocast: the base layers run in bf16, the adapter ``s·U S Vᵀ`` and its gradients
  ``G_K``, ``G_L``, ``G_S`` in float32 (autocast is off inside the adapter's autograd function),
  so the optimizer's QR and SVD always see float32.
* fp16 with ``torch.amp.GradScaler``: a step whose gradients hold inf/NaN is skipped by the
  scaler, leaving factors, ranks and optimizer state untouched.
* A bf16 base model: factors stay float32 whether the model was cast before or after injection.
* Activation checkpointing recomputes the adapter forward; gradients must not change.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_config
from torch.nn import functional as F

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, geolora_layers, get_geolora_model

CONFIG = dict(target_modules=["query", "value", "dense"], r=2, r_max=8, tau=0.1)


def _adapted(model: torch.nn.Module) -> torch.nn.Module:
    return get_geolora_model(model, GeoLoRAConfig(**CONFIG, modules_to_save=["classifier"]))


def _bert() -> torch.nn.Module:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(tiny_bert_config())


def _batch(seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (size, 10), generator=g)
    return ids, (ids[:, 0] < 32).long()


def _factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": getattr(layer, key).detach().clone()
        for name, layer in geolora_layers(model).items()
        for key in ("U", "S", "V", "rank")
    }


def _assert_orthonormal(model: torch.nn.Module, atol: float) -> None:
    for name, layer in geolora_layers(model).items():
        u, _, v = (t.detach() for t in layer.active_factors())
        for basis in (u, v):
            eye = torch.eye(basis.shape[1], dtype=basis.dtype)
            assert float((basis.T @ basis - eye).abs().max()) <= atol, name


def test_bf16_autocast_trains_with_float32_factors(monkeypatch):
    model = _adapted(_bert()).train()
    optimizer = GeoLoRAOptimizer(model, lr=1e-2)
    seen = []
    qr, svd = torch.linalg.qr, torch.linalg.svd
    monkeypatch.setattr(
        torch.linalg, "qr", lambda a, *x, **k: seen.append(a.dtype) or qr(a, *x, **k)
    )
    monkeypatch.setattr(
        torch.linalg, "svd", lambda a, *x, **k: seen.append(a.dtype) or svd(a, *x, **k)
    )
    ids, labels = _batch()
    losses = []
    for _ in range(25):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
            assert logits.dtype == torch.bfloat16  # the base model really runs in bf16
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        for layer in geolora_layers(model).values():
            assert {p.grad.dtype for p in (layer.U, layer.S, layer.V)} == {torch.float32}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert seen and set(seen) == {torch.float32}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    _assert_orthonormal(model, atol=1e-5)


def _scaled_step(model, optimizer, scaler, ids, labels, poison=None) -> None:
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(input_ids=ids).logits.float(), labels)
    scaler.scale(loss).backward()
    if poison is not None:
        poison.grad[0, 0] = float("nan")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


def test_fp16_gradscaler_skips_nonfinite_steps_untouched():
    model = _adapted(_bert()).train()
    optimizer = GeoLoRAOptimizer(model, lr=1e-2)
    # 2**40 overflows fp16 gradients inside the backward: the scaler must skip that step.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    ids, labels = _batch()
    before = _factors(model)
    _scaled_step(model, optimizer, scaler, ids, labels)
    assert scaler.get_scale() == 2.0**39, "the first step did not overflow"
    assert all(torch.equal(before[k], v) for k, v in _factors(model).items())
    assert optimizer.param_groups[0]["steps"] == 0 and not optimizer.state

    scaler.update(2.0**8)
    _scaled_step(model, optimizer, scaler, ids, labels)  # a clean step moves the factors
    assert scaler.get_scale() == 2.0**8
    assert optimizer.param_groups[0]["steps"] == 1
    moved = _factors(model)
    assert any(not torch.equal(before[k], v) for k, v in moved.items())

    layer = next(iter(geolora_layers(model).values()))
    state = {k: v.clone() for k, v in optimizer.state[layer.U].items() if torch.is_tensor(v)}
    _scaled_step(model, optimizer, scaler, ids, labels, poison=layer.S)  # injected NaN
    assert scaler.get_scale() == 2.0**7
    assert all(torch.equal(moved[k], v) for k, v in _factors(model).items())
    assert optimizer.param_groups[0]["steps"] == 1
    assert all(torch.equal(state[k], optimizer.state[layer.U][k]) for k in state)


@pytest.mark.parametrize("cast_before_injection", [True, False])
def test_bf16_base_model_keeps_float32_factors(cast_before_injection):
    base = _bert()
    if cast_before_injection:
        model = _adapted(base.to(torch.bfloat16)).train()
    else:
        model = _adapted(base).train()
        reference = _factors(model)
        model.to(torch.bfloat16)
        assert all(torch.equal(reference[k], v) for k, v in _factors(model).items())
    assert model.classifier.weight.dtype == torch.bfloat16
    for layer in geolora_layers(model).values():
        assert {p.dtype for p in (layer.U, layer.S, layer.V)} == {torch.float32}
    optimizer = GeoLoRAOptimizer(model, lr=1e-2)
    ids, labels = _batch()
    for _ in range(5):
        logits = model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    for layer in geolora_layers(model).values():
        assert layer.U.dtype == torch.float32 and torch.isfinite(layer.S).all()
    assert any(layer.current_rank != CONFIG["r"] for layer in geolora_layers(model).values())
    _assert_orthonormal(model, atol=1e-5)


def _enable_checkpointing(model: torch.nn.Module, use_reentrant: bool) -> None:
    """transformers 5 renamed ``gradient_checkpointing_enable`` (a deprecated alias now)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_same_gradients(use_reentrant):
    model = _adapted(_bert()).train()
    with torch.no_grad():  # S = 0 at init would make G_L vanish; give the adapters some weight
        for layer in geolora_layers(model).values():
            layer.S[:2, :2] = torch.diag(torch.tensor([0.3, 0.1]))
    ids, labels = _batch()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        F.cross_entropy(model(input_ids=ids).logits, labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    _enable_checkpointing(model, use_reentrant)
    if use_reentrant:  # transformers >= 5 does this itself; 4.x needs it (docs/training.md)
        model.enable_input_require_grads()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert sum(k.endswith((".U", ".S", ".V")) for k in plain) == 3 * len(geolora_layers(model))
    for name, g in plain.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(g, checkpointed[name], rtol=1e-5, atol=1e-7), name
