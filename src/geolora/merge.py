"""Merging GeoLoRA adapters into the base weights, and switching adapters off.

    merge:    W0 ← W0 + ΔW,    ΔW = s · U S Vᵀ   (out × in)
    unmerge:  W0 ← W0 − ΔW

``ΔW`` is laid out like the base weight by the layer's kind (:meth:`GeoLoRALayer.to_weight_layout`:
transposed for transformers' ``Conv1D`` and ``nn.Embedding``, reshaped to the kernel for
convolutions). A merged layer is marked ``merged`` and its forward returns
the base output alone, so the adapter is never added twice. Merging is for inference: a merged
adapter receives no gradients, and unmerging after changing the factors would subtract the wrong
``ΔW``. In floating point, unmerge restores ``W0`` up to rounding (``W0 + ΔW − ΔW``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .layers import GeoLoRALayer
from .model import geolora_layers
from .model_methods import detach_model_methods
from .submodules import replace_submodule

__all__ = ["disable_adapter", "merge_adapter", "merge_and_unload", "unmerge_adapter"]


def _layers(model: nn.Module) -> dict[str, GeoLoRALayer]:
    layers = geolora_layers(model)
    if not layers:
        raise ValueError("This model has no GeoLoRA layers: nothing to merge or disable.")
    return layers


@torch.no_grad()
def merge_adapter(model: nn.Module) -> None:
    """Add every adapter's ``ΔW`` into its base weight, in place (layers already merged are
    skipped); the model's outputs stay the same."""
    for layer in _layers(model).values():
        if not layer.merged:
            layer.base_layer.weight.add_(layer.delta_like_weight())
            layer.merged = True


@torch.no_grad()
def unmerge_adapter(model: nn.Module) -> None:
    """Subtract every merged adapter's ``ΔW`` from its base weight again, in place."""
    for layer in _layers(model).values():
        if layer.merged:
            layer.base_layer.weight.sub_(layer.delta_like_weight())
            layer.merged = False


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and replace each GeoLoRA layer by its base layer, in place.

    Returns ``model``, now a plain model (no GeoLoRA layers, no ``geolora_config``) whose weights
    include the adapters; ``modules_to_save`` modules keep their trained weights.
    """
    merge_adapter(model)
    for name, layer in geolora_layers(model).items():
        replace_submodule(model, name, layer.base_layer)
    for module in model.modules():
        if "geolora_config" in vars(module):
            del module.geolora_config
            detach_model_methods(module)
    return model


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the ``with`` block the model computes the base model's outputs; every layer's
    ``disabled`` flag is restored on exit, also on an exception.

    ``modules_to_save`` modules keep their trained weights (they are not adapters). Refused on a
    merged model: call :func:`unmerge_adapter` first.
    """
    layers = list(_layers(model).values())
    if any(layer.merged for layer in layers):
        raise ValueError(
            "disable_adapter on a merged model would still include the merged adapters: call "
            "unmerge_adapter(model) first."
        )
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.disabled = flag
