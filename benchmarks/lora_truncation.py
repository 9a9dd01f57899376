"""LoRA trained at a high rank, then truncated to a budget by peft's own conversion
(``convert_to_lora`` / ``save_as_lora`` in ``peft.tuners.lora.conversion``, peft ≥ 0.21): the
baseline a user would reach for instead of an adaptive rank (issue 9, :mod:`planted_ranks`)."""

from __future__ import annotations

import tempfile
from typing import Any

import planted
import torch
from methods import Prepared


def converted(prep: Prepared, rank: float, setup: planted.PlantedSetup) -> dict[str, Any]:
    """``save_as_lora(rank)`` of the trained model, loaded back onto a fresh pretrained student
    with ``PeftModel.from_pretrained``: its held-out loss, ranks and parameters."""
    from peft import PeftModel
    from peft.tuners.lora.conversion import save_as_lora

    with tempfile.TemporaryDirectory() as path:
        save_as_lora(path, prep.model, rank=rank)
        model = PeftModel.from_pretrained(planted.student(), path).eval()
    ranks, params = {}, 0
    for name, module in model.named_modules():
        a = getattr(module, "lora_A", None)
        if isinstance(a, torch.nn.ModuleDict) and "default" in a:
            k = a["default"].weight.shape[0]
            ranks[name.removeprefix("base_model.model.")] = k
            params += k * (module.in_features + module.out_features)
    return {
        "relative_loss": planted.relative_loss(model, setup),
        "ranks": ranks,
        "total_rank": sum(ranks.values()),
        "adapter_params": params,
        "rank_argument": rank,
    }


def truncations(prep: Prepared, budget: int, n_modules: int, setup) -> dict[str, Any]:
    """Energy threshold (bisection: the largest threshold whose total rank ≤ ``budget``) and a
    uniform rank ``budget // n_modules``, each through peft's conversion."""
    from peft.tuners.lora.conversion import convert_to_lora

    def total(threshold: float) -> int:
        _, state = convert_to_lora(prep.model, rank=threshold)
        return sum(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))

    low, high = 1e-6, 1.0  # total(low) is the smallest possible (one per module)
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if total(mid) <= budget else (low, mid)
    return {
        "energy": converted(prep, low, setup),
        "uniform": converted(prep, budget // n_modules, setup),
    }
