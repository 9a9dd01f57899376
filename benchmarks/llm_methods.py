"""The three ways ``llm_sft.py`` fine-tunes a causal LM, behind one small interface.

* ``geolora``: GeoLoRA adapters with the library defaults (``GeoLoRAConfig``: r = 8, r_max = 32,
  τ = 0.1, margin 0.1, scale s = 1) and :class:`geolora.GeoLoRAOptimizer` (its default base
  rule, riemannian_adam);
* ``geolora-budget``: the same with an exact global budget of LoRA r=8's parameter count,
  ``Σ 8 (n + m)`` over the adapted layers (``budget_unit="params"``, each kept singular value
  costing ``n + m + 1``), so that its final adapters are no larger than LoRA's;
* ``geolora-rows``: the library defaults with ``base_rule="riemannian_adam_rows"`` (each row's
  step capped, :mod:`geolora.optim.base_rules`), and ``geolora-rows-budget`` that rule with the
  budget of ``geolora-budget``; ``geolora-features`` and ``geolora-features-budget`` the same with
  ``base_rule="riemannian_adam_features"``; run by ``llm_lr.py``, not part of the main table;
* ``lora``: peft ``LoraConfig(r=8, lora_alpha=16)`` with AdamW;
* ``adalora``: peft ``AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16)`` with AdamW, budget
  phases ``tinit = 10 %`` and ``tfinal = 20 %`` of the steps, ``update_and_allocate(step)`` after
  every ``optimizer.step()``.

All three adapt the same modules (the architecture's default targets of ``geolora finetune``),
clip gradients at norm 1 and take the learning rate per step from the caller.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model, rank_report
from geolora.app.models import default_targets, load_causal_lm
from geolora.model import find_target_names

METHODS = ("geolora", "geolora-budget", "lora", "adalora")
LEARNING_RATES = {
    "geolora": 1e-3, "geolora-budget": 1e-3, "geolora-rows": 1e-3, "geolora-rows-budget": 1e-3,
    "geolora-features": 1e-3, "geolora-features-budget": 1e-3, "lora": 1e-3, "adalora": 3e-3,
}  # fmt: skip


class MethodTrainer:
    """One method's model and optimizer; :meth:`step` is one optimizer step."""

    def __init__(self, method: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.method, self.model, self.optimizer, self.steps = method, model, optimizer, 0
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def step(self, batch: dict[str, Any], lr: float, marks: list[float] | None = None) -> float:
        """One training step at ``lr``; with ``marks``, appends ``time.perf_counter()`` at the
        start and after the forward, backward, clipping, optimizer step and ``zero_grad``."""
        mark = marks.append if marks is not None else lambda _: None
        mark(time.perf_counter())
        self.model.train()
        loss = self.model(**batch).loss
        mark(time.perf_counter())
        loss.backward()
        mark(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        mark(time.perf_counter())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.method == "adalora":
            self.model.base_model.update_and_allocate(self.steps)
        mark(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        mark(time.perf_counter())
        self.steps += 1
        return float(loss.detach())

    def ranks(self) -> dict[str, int]:
        """The rank of every adapter (AdaLoRA: its unmasked singular values)."""
        if self.method.startswith("geolora"):
            return rank_report(self.model)["ranks"]
        ranks = {}
        for name, module in self.model.named_modules():
            if self.method == "lora" and hasattr(module, "lora_A") and "default" in module.lora_A:
                ranks[name] = module.r["default"]
            if (
                self.method == "adalora"
                and hasattr(module, "lora_E")
                and "default" in module.lora_E
            ):
                ranks[name] = int((module.lora_E["default"] != 0).sum())
        return ranks

    def trainable_params(self) -> int:
        """Parameters at the final ranks: ``r (n + m)`` per LoRA adapter, ``r (n + m) + r`` per
        GeoLoRA and AdaLoRA adapter (their diagonal), nothing for masked AdaLoRA values."""
        if self.method.startswith("geolora"):
            return rank_report(self.model)["trainable_params"]
        if self.method == "lora":
            return sum(p.numel() for p in self.trainable)
        total = 0
        for name, rank in self.ranks().items():
            layer = self.model.get_submodule(name)
            total += rank * (layer.in_features + layer.out_features + 1)
        return total


def build(
    method: str,
    model_dir: str,
    total_steps: int,
    four_bit: bool = False,
    checkpointing: bool = False,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    lr: float | None = None,
) -> MethodTrainer:
    """Load the model from ``model_dir`` onto ``device`` in ``dtype`` and set up ``method`` on
    it (seeded; the adapters are float32 whatever ``dtype``); ``lr`` defaults to the method's
    entry of :data:`LEARNING_RATES`."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    model, _ = load_causal_lm(model_dir)
    model.to(device=device, dtype=dtype)
    targets = default_targets(model)
    if four_bit:
        from geolora.quantized import quantize_linear_layers

        quantize_linear_layers(model)
    if checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    lr = LEARNING_RATES[method] if lr is None else lr
    if method.startswith("geolora"):
        budget = {}
        if method.endswith("-budget"):
            names = find_target_names(model, GeoLoRAConfig(target_modules=targets))
            layers = [model.get_submodule(name) for name in names]
            lora_params = sum(8 * (m.in_features + m.out_features) for m in layers)
            budget = {"budget": lora_params, "budget_unit": "params"}
        get_geolora_model(model, GeoLoRAConfig(target_modules=targets, **budget))
        rule = next(
            (f"riemannian_adam_{k}" for k in ("rows", "features") if f"-{k}" in method),
            "riemannian_adam",
        )
        return MethodTrainer(method, model, GeoLoRAOptimizer(model, lr=lr, base_rule=rule))
    if method == "lora":
        config: Any = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    else:
        config = AdaLoraConfig(
            init_r=12, target_r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
            total_step=total_steps, tinit=max(1, total_steps // 10),
            tfinal=max(1, total_steps // 5), deltaT=1,
        )  # fmt: skip
    model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return MethodTrainer(method, model, torch.optim.AdamW(trainable, lr=lr))
