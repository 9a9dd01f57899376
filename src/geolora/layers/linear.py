"""Linear kinds: ``nn.Linear`` (weight out × in, ``y = x Wᵀ + b``) and transformers' ``Conv1D``
(GPT-2; weight in × out, ``y = x W + b``).

Both modify the matrix ``W`` (n × m = out × in) with the input projection ``down(x; V) = x V``,
whose gradients are ``∂/∂V <g, x V> = xᵀ g`` and ``∂/∂x <g, x V> = g Vᵀ``. ``ΔW`` is laid out as
is for ``nn.Linear`` and transposed for ``Conv1D``; peft's tensors are ``A = Vᵀ`` (r × m) and
``B = s U S`` (n × r) for both (peft's ``fan_in_fan_out`` applies to the base weight only).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..autograd import column_major, thin_weight_grad
from .base import GeoLoRALayer

__all__ = ["GeoLoRAConv1D", "GeoLoRALinear", "LinearProjection", "is_transformers_conv1d"]


class LinearProjection:
    """``down(x; V) = x V`` (channels last already), with ``V`` column-major and ``xᵀ g`` formed
    as ``(gᵀ x)ᵀ``: the layouts CPU BLAS multiplies fastest (:func:`geolora.autograd.column_major`).
    """

    def down(self, x: Tensor, v: Tensor) -> Tensor:
        return x @ column_major(v)

    def weight_grad(self, x: Tensor, g: Tensor, v: Tensor) -> Tensor:
        return thin_weight_grad(x, g)

    def input_grad(self, x: Tensor, g: Tensor, v: Tensor) -> Tensor:
        return g @ v.t()


LINEAR = LinearProjection()


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (False when transformers is missing)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return False
    return isinstance(module, Conv1D)


class GeoLoRALinear(GeoLoRALayer):
    """Adapter on ``nn.Linear`` (weight out × in)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @staticmethod
    def matrix_shape(module: nn.Linear) -> tuple[int, int]:
        return module.out_features, module.in_features

    def __init__(self, base_layer: nn.Linear, **kwargs) -> None:
        super().__init__(base_layer, LINEAR, **kwargs)


class GeoLoRAConv1D(GeoLoRALayer):
    """Adapter on transformers' ``Conv1D`` (weight in × out)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return is_transformers_conv1d(module)

    @staticmethod
    def matrix_shape(module: nn.Module) -> tuple[int, int]:
        in_features, out_features = module.weight.shape
        return out_features, in_features

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        super().__init__(base_layer, LINEAR, **kwargs)

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.t()
