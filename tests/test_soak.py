"""Soak: 2,000 GeoLoRA steps at learning rate 0.1 for both base rules on a tiny regression MLP
(fresh minibatches each step, so ranks keep moving).

Every step: finite loss and factors, ``r_min ≤ r ≤ r_max``. Memory stays flat: the optimizer
state keeps the same tensors (keys, shapes, dtypes) from the first step to the last, since all
state is preallocated at ``r_max``, and the number of live Python objects does not grow.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch.nn import functional as F

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, geolora_layers, get_geolora_model

STEPS = 2000


def _state_signature(optimizer: torch.optim.Optimizer) -> list[tuple]:
    return sorted(
        (id(param), key, tuple(value.shape), value.dtype)
        for param, state in optimizer.state.items()
        for key, value in state.items()
        if torch.is_tensor(value)
    )


@pytest.mark.parametrize("base_rule", ["riemannian_adam", "riemannian_adam_rows", "adam", "sgd"])
def test_soak_high_learning_rate(base_rule):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 1),
    )
    config = GeoLoRAConfig(target_modules=["0", "2"], r=2, r_max=6, tau=0.1, modules_to_save=["4"])
    model = get_geolora_model(net, config)
    sgd = base_rule == "sgd"
    optimizer = GeoLoRAOptimizer(
        model, lr=0.1, base_rule=base_rule, momentum=0.9 if sgd else 0.0, other_lr=1e-2
    )
    layers = list(geolora_layers(model).values())
    teacher = torch.randn(8, 1)
    gen = torch.Generator().manual_seed(1)
    losses, rank_history = [], set()
    signature = objects = None
    for step in range(STEPS):
        x = torch.randn(16, 8, generator=gen)
        loss = F.mse_loss(model(x), torch.tanh(x @ teacher))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        current = tuple(layer.current_rank for layer in layers)
        rank_history.add(current)
        assert all(config.r_min <= r <= layer.r_max for r, layer in zip(current, layers))
        if step == 0:
            signature = _state_signature(optimizer)
        if step == 100:
            gc.collect()
            objects = len(gc.get_objects())
    assert all(map(lambda v: v == v and abs(v) != float("inf"), losses)), "NaN/inf loss"
    for layer in layers:
        assert all(torch.isfinite(p).all() for p in (layer.U, layer.S, layer.V))
        u, _, v = (t.detach() for t in layer.active_factors())
        for basis in (u, v):
            assert (basis.T @ basis - torch.eye(basis.shape[1])).abs().max() < 1e-5
    assert _state_signature(optimizer) == signature
    gc.collect()
    assert len(gc.get_objects()) - objects < 1000, "live Python objects keep growing"
    assert len(rank_history) >= 3, "ranks never moved: the soak would not exercise truncation"
    assert sum(losses[-100:]) < 0.5 * sum(losses[:100])
