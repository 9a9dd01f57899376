"""A known-rank regression for optimizer tests: one 64×48 linear layer whose target weight is
the base weight plus a planted rank-k change, fitted on fresh Gaussian inputs every step."""

from __future__ import annotations

import torch
from torch import nn

from geolora import GeoLoRAConfig, get_geolora_model


def regression(rank_change, r0, r_max=48, tau=0.01, dtype=torch.float64, seed=0, size=1 / 8, **cfg):
    """A 64×48 layer whose target weight is the base weight plus a rank-k change."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(48, 64, bias=False).to(dtype)
    change = torch.randn(64, rank_change, generator=gen, dtype=dtype)
    change = change @ torch.randn(rank_change, 48, generator=gen, dtype=dtype) * size
    target = layer.weight.detach() + change
    net = nn.Sequential(layer)
    config = GeoLoRAConfig(target_modules=["0"], r=r0, r_max=r_max, tau=tau, **cfg)
    get_geolora_model(net, config)
    return net, target, change, gen


def regression_step(net, target, opt, gen, batch=32):
    x = torch.randn(batch, 48, generator=gen, dtype=target.dtype)
    loss = 0.5 * ((net(x) - x @ target.T) ** 2).sum(-1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def relative_error(net, change):
    return float((net[0].delta_weight().detach() - change).norm() / change.norm())
