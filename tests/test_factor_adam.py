"""benchmarks/factor_adam.py: LoRA's Adam with a chosen second-moment granularity."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import factor_adam  # noqa: E402


def _problem(seed=0, r=3, n_in=7, n_out=5):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, n_in, generator=gen, dtype=torch.float64)
    b = torch.randn(n_out, r, generator=gen, dtype=torch.float64)
    x = torch.randn(32, n_in, generator=gen, dtype=torch.float64)
    y = torch.randn(32, n_out, generator=gen, dtype=torch.float64)
    return a, b, x, y


def _train(a, b, x, y, granularity, steps=5, lr=1e-2, grad_scale_b=1.0):
    a, b = nn.Parameter(a.clone()), nn.Parameter(b.clone())
    opt = factor_adam.FactorAdam([{"params": [a, b]}], lr, granularity)
    for _ in range(steps):
        opt.zero_grad()
        ((x @ a.T @ b.T - y) ** 2).mean().backward()
        b.grad *= grad_scale_b
        opt.step()
    return a.detach(), b.detach()


def test_coordinate_granularity_is_adam():
    a, b, x, y = _problem()
    mine = _train(a, b, x, y, "coordinate")
    pa, pb = nn.Parameter(a.clone()), nn.Parameter(b.clone())
    ref = torch.optim.Adam([pa, pb], lr=1e-2)
    for _ in range(5):
        ref.zero_grad()
        ((x @ pa.T @ pb.T - y) ** 2).mean().backward()
        ref.step()
    torch.testing.assert_close(mine[0], pa.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(mine[1], pb.detach(), rtol=0, atol=1e-12)


def test_adapter_granularity_shares_one_second_moment_between_a_and_b():
    """Scaling B's gradient changes A's steps only when A and B share the second moment."""
    a, b, x, y = _problem()
    for granularity, shared in (("adapter", True), ("tensor", False), ("feature", False)):
        plain = _train(a, b, x, y, granularity, steps=1)[0]
        scaled = _train(a, b, x, y, granularity, steps=1, grad_scale_b=10.0)[0]
        assert (not torch.allclose(plain, scaled, rtol=0, atol=1e-9)) == shared, granularity


@pytest.mark.parametrize(
    "granularity, invariant",
    [("feature", True), ("adapter", True), ("coordinate", False), ("channel", False)],
)
def test_channel_rotation_invariance(granularity, invariant):
    """``A → QA``, ``B → BQᵀ`` is the same adapter in other channel coordinates: the feature and
    adapter granularities take the same steps in ``BA``; the others do not."""
    a, b, x, y = _problem()
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(9)).double())
    a1, b1 = _train(a, b, x, y, granularity)
    a2, b2 = _train(q @ a, b @ q.T, x, y, granularity)
    close = torch.allclose(b1 @ a1, b2 @ a2, rtol=0, atol=1e-10)
    assert close == invariant


def test_bad_input():
    p = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="granularity must be one of"):
        factor_adam.FactorAdam([{"params": p}], 1e-3, "row")
    with pytest.raises(ValueError, match=r"one adapter's \[A, B\]"):
        factor_adam.FactorAdam([{"params": p[:1]}], 1e-3, "adapter")
    with pytest.raises(ValueError, match="no trainable peft LoRA adapters"):
        factor_adam.for_lora(nn.Linear(2, 2), "adapter", 1e-3)


def test_for_lora_groups_each_adapted_module():
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    opt = factor_adam.for_lora(model, "feature", 1e-3)
    shapes = [tuple(tuple(p.shape) for p in g["params"]) for g in opt.param_groups]
    assert shapes == [((2, 6), (4, 2)), ((2, 4), (3, 2))]
