"""Merging GeoLoRA adapters into the base weights, and switching adapters off.

    merge:    W0 ← W0 + ΔW,    ΔW = s · U S Vᵀ   (out × in)
    unmerge:  W0 ← W0 − ΔW

``ΔW`` is laid out like the base weight: transposed for transformers' ``Conv1D`` (whose weight is
in × out) and reshaped to ``out × C_in × kh × kw`` for ``Conv2d`` (the columns of ``ΔW`` follow
the row-major flattening of a kernel). A merged layer is marked ``merged`` and its forward returns
the base output alone, so the adapter is never added twice. Merging is for inference: a merged
adapter receives no gradients, and unmerging after changing the factors would subtract the wrong
``ΔW``. In floating point, unmerge restores ``W0`` up to rounding (``W0 + ΔW − ΔW``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .layers import GeoLoRAConv1D, GeoLoRALayer
from .model import geolora_layers
from .quantized import is_4bit

__all__ = ["disable_adapter", "merge_adapter", "merge_and_unload", "unmerge_adapter"]


def _layers(model: nn.Module) -> dict[str, GeoLoRALayer]:
    layers = geolora_layers(model)
    if not layers:
        raise ValueError("This model has no GeoLoRA layers: nothing to merge or disable.")
    return layers


def _delta_like_weight(layer: GeoLoRALayer) -> Tensor:
    """``ΔW`` in the layout and dtype of ``layer.base_layer.weight``."""
    if is_4bit(layer.base_layer):
        raise ValueError(
            "Cannot merge an adapter into a 4-bit base layer (it would be rounded again): "
            "call geolora.quantized.dequantize_model(model) first, then merge."
        )
    weight = layer.base_layer.weight
    delta = layer.delta_weight().detach()
    if isinstance(layer, GeoLoRAConv1D):
        delta = delta.t()
    return delta.reshape(weight.shape).to(weight.dtype)


@torch.no_grad()
def merge_adapter(model: nn.Module) -> None:
    """Add every adapter's ``ΔW`` into its base weight, in place (layers already merged are
    skipped); the model's outputs stay the same."""
    for layer in _layers(model).values():
        if not layer.merged:
            layer.base_layer.weight.add_(_delta_like_weight(layer))
            layer.merged = True


@torch.no_grad()
def unmerge_adapter(model: nn.Module) -> None:
    """Subtract every merged adapter's ``ΔW`` from its base weight again, in place."""
    for layer in _layers(model).values():
        if layer.merged:
            layer.base_layer.weight.sub_(_delta_like_weight(layer))
            layer.merged = False


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and replace each GeoLoRA layer by its base layer, in place.

    Returns ``model``, now a plain model (no GeoLoRA layers, no ``geolora_config``) whose weights
    include the adapters; ``modules_to_save`` modules keep their trained weights.
    """
    merge_adapter(model)
    for name, layer in geolora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    for module in model.modules():
        if "geolora_config" in vars(module):
            del module.geolora_config
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
