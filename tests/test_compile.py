"""``torch.compile`` of a GeoLoRA model's forward (deselect with ``-m "not compile"``).

What can break: dynamo has to trace the adapter's custom autograd function and AOTAutograd has to
differentiate through it, and each layer's rank is a Python int that changes between steps. By
default dynamo specialises on it (one graph per tuple of ranks, then eager after
``recompile_limit``); with ``torch._dynamo.config.allow_unspec_int_on_nn_module = True`` and
``dynamic=True`` the ranks are symbolic and one graph serves every rank.

The default backend here is ``aot_eager`` (dynamo + AOTAutograd, no code generation), which
exercises everything GeoLoRA adds in seconds. ``GEOLORA_TEST_INDUCTOR=1`` switches to the default
inductor backend, which also compiles C++ kernels (about 20 s of CPU for this tiny model).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import functional as F

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, geolora_layers, get_geolora_model

pytestmark = pytest.mark.compile
BACKEND = "inductor" if os.environ.get("GEOLORA_TEST_INDUCTOR") == "1" else "aot_eager"


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(12, 32)
        self.h = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.h(torch.tanh(self.a(x)))))


def _factor_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        p.grad.clone()
        for layer in geolora_layers(model).values()
        for p in (layer.U, layer.S, layer.V)
    ]


def test_compiled_forward_and_backward_match_eager_across_rank_changes():
    import torch._dynamo as dynamo

    config = GeoLoRAConfig(
        target_modules=["a", "h"], r=1, r_max=12, tau=0.05, modules_to_save=["out"]
    )
    model = get_geolora_model(_Net(), config)
    optimizer = GeoLoRAOptimizer(model, lr=5e-2)
    dynamo.reset()
    dynamo.utils.counters.clear()
    seen_ranks = set()
    with dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        compiled = torch.compile(model, backend=BACKEND, dynamic=True)
        gen = torch.Generator().manual_seed(0)
        for _ in range(6):
            x = torch.randn(16, 12, generator=gen)
            y = torch.randint(0, 3, (16,), generator=gen)
            F.cross_entropy(model(x), y).backward()
            eager_out, eager_grads = model(x).detach(), _factor_grads(model)
            optimizer.zero_grad()
            out = compiled(x)
            F.cross_entropy(out, y).backward()
            assert torch.allclose(out, eager_out, atol=1e-6)
            for g, ref in zip(_factor_grads(model), eager_grads):
                assert torch.allclose(g, ref, atol=1e-6)
            optimizer.step()
            optimizer.zero_grad()
            seen_ranks.add(tuple(layer.current_rank for layer in geolora_layers(model).values()))
    assert len(seen_ranks) >= 3, "ranks did not move: nothing to recompile for"
    # first call static, then one dynamic graph for every rank: no recompile per rank change
    assert dynamo.utils.counters["stats"]["unique_graphs"] <= 2, seen_ranks
