"""The process-wide guard against ordinary optimizers on GeoLoRA factors.

``U.grad``, ``V.grad`` and ``S.grad`` hold ``G_K = s G V``, ``G_L = s Gᵀ U`` and
``G_S = s Uᵀ G V`` (:mod:`geolora.autograd`), not the gradients of ``U``, ``S`` and ``V``: a step
of AdamW, SGD or any optimizer other than :class:`geolora.GeoLoRAOptimizer` along them destroys
the orthonormal bases and never moves the ranks. :func:`refuse_plain_optimizer` is registered
as a global optimizer step pre-hook, so it runs before every ``optimizer.step()`` of every torch
optimizer (a transformers ``Trainer`` built without ``optimizers=`` included) and raises
:class:`PlainOptimizerError` before any parameter changes when such an optimizer holds factors
that have gradients. An optimizer found safe (a GeoLoRAOptimizer, or one that holds no factor) is
remembered and costs one lookup per step afterwards, until its parameter groups change.
"""

from __future__ import annotations

import weakref

import torch

from ..layers import is_factor

__all__ = ["PlainOptimizerError", "refuse_plain_optimizer"]


class PlainOptimizerError(RuntimeError):
    """An ordinary optimizer was about to step GeoLoRA factors (nothing was changed)."""


_allowed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Optimizers found safe (a GeoLoRAOptimizer, or no factor held), with their group count then."""


def refuse_plain_optimizer(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global step pre-hook: raise :class:`PlainOptimizerError` if ``optimizer`` is not a
    GeoLoRAOptimizer (or a wrapper of one) and would step a GeoLoRA factor (one that has a
    ``.grad``)."""
    groups = len(optimizer.param_groups)
    if _allowed.get(optimizer) == groups:
        return
    from .optimizer import GeoLoRAOptimizer  # registered from there: no import cycle

    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer  # wrappers such as accelerate's AcceleratedOptimizer
    factors = [p for g in optimizer.param_groups for p in g["params"] if is_factor(p)]
    if isinstance(inner, GeoLoRAOptimizer) or not factors:
        _allowed[optimizer] = groups
        return
    stepped = sum(p.grad is not None for p in factors)
    if stepped:
        raise PlainOptimizerError(
            f"{type(optimizer).__name__} is about to step {stepped} GeoLoRA factor tensors (U, S, "
            "V); nothing was changed. Their .grad fields hold the integrator's G V, Gᵀ U, Uᵀ G V, "
            "not gradients, and a plain step would corrupt the adapters. Use "
            "GeoLoRAOptimizer(model, ...); with a transformers Trainer pass "
            "optimizers=geolora.create_geolora_optimizer(model, args, num_training_steps) "
            "(and add_geolora_callback(trainer) for rank logs and resuming)."
        )
