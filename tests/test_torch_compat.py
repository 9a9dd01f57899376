"""The guarded multi-tensor ops: the per-tensor fallback (a torch without ``torch._foreach_*``)
gives the same training as the fused ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model
from geolora import _torch_compat as compat

FUSED = ("_foreach_copy_", "_foreach_add_", "_foreach_norm")


def _train(steps: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 12), nn.Linear(12, 3))
    get_geolora_model(
        net, GeoLoRAConfig(target_modules=["0", "2"], r=2, tau=0.05, modules_to_save=["3"])
    )
    opt = GeoLoRAOptimizer(net, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=gen)
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = [t.clone() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return [p.detach().clone() for p in net.parameters()] + state


def test_fallback_trains_exactly_like_the_fused_ops(monkeypatch):
    fused = _train()
    for name in FUSED:
        monkeypatch.delattr(torch, name, raising=False)
    assert all(compat._fused(n.removeprefix("_foreach_")) is None for n in FUSED)
    fallback = _train()
    assert len(fused) == len(fallback)
    for a, b in zip(fused, fallback):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("hide", [False, True])
def test_helpers_match_their_definitions(monkeypatch, hide):
    if hide:
        for name in FUSED:
            monkeypatch.delattr(torch, name, raising=False)
    xs = [torch.randn(3, 4), torch.randn(5), torch.zeros(2, 2)]
    norms = compat.foreach_norm(xs)
    assert [float(n) for n in norms] == pytest.approx([float(x.norm()) for x in xs])
    targets = [torch.empty_like(x) for x in xs]
    compat.foreach_copy_(targets, xs)
    assert all(torch.equal(t, x) for t, x in zip(targets, xs))
    compat.foreach_add_(targets, 1.0)
    assert all(torch.equal(t, x + 1) for t, x in zip(targets, xs))
