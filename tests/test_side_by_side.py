"""The geometric step's independent pairs on two threads (geolora.optim.side_by_side): the same
results bit for bit as in turn, errors from either side reach the caller, no autograd graph."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import geolora.optim.optimizer
from geolora import GeoLoRAConfig, GeoLoRAOptimizer, geolora_layers, get_geolora_model
from geolora.optim.side_by_side import side_by_side


def _stepped(model: nn.Module, threads: int, steps: int) -> nn.Module:
    """``model`` after ``steps`` optimizer steps on fixed data with torch at ``threads``."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 24, generator=gen), torch.randn(32, 20, generator=gen)
    opt = GeoLoRAOptimizer(model, lr=0.05)
    before = torch.get_num_threads()
    try:
        for _ in range(steps):
            torch.set_num_threads(1)  # the forward and backward the same in both runs
            nn.functional.mse_loss(model(x), y).backward()
            torch.set_num_threads(threads)  # only the optimizer step sees the thread count
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(before)
    return model


def test_pairs_side_by_side_step_bit_for_bit_as_in_turn(monkeypatch):
    """At 2 torch threads the step runs its QR and SVD pairs on two threads; factors and ranks
    equal those of the step at 1 thread (pairs in turn) exactly, with ranks that move."""
    calls = []

    def counted(first, second, parallel):
        calls.append(parallel)
        return side_by_side(first, second, parallel)

    monkeypatch.setattr(geolora.optim.optimizer, "side_by_side", counted)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 20))
    cfg = GeoLoRAConfig(target_modules=["0", "2"], r=2, r_max=12, shrinkage=0.05)
    model = get_geolora_model(net, cfg)
    in_turn = _stepped(copy.deepcopy(model), threads=1, steps=6)
    assert calls and not any(calls)
    calls.clear()
    paired = _stepped(copy.deepcopy(model), threads=2, steps=6)
    assert calls and all(calls)
    ranks = [layer.current_rank for layer in geolora_layers(in_turn).values()]
    assert ranks != [2, 2]  # the steps changed the ranks
    assert ranks == [layer.current_rank for layer in geolora_layers(paired).values()]
    for a, b in zip(in_turn.parameters(), paired.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("parallel", [False, True])
def test_side_by_side_returns_both_and_raises_either_error(parallel):
    assert side_by_side(lambda: 1, lambda: "two", parallel) == (1, "two")

    def fails():
        raise ValueError("boom")

    for first, second in ((fails, lambda: 2), (lambda: 1, fails)):
        with pytest.raises(ValueError, match="boom"):
            side_by_side(first, second, parallel)


def test_helper_thread_builds_no_graph():
    leaf = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        _, doubled = side_by_side(lambda: None, lambda: leaf * 2, True)
    assert not doubled.requires_grad
