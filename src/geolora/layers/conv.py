"""Convolutions ``nn.Conv1d`` and ``nn.Conv2d`` (``groups == 1``, ``padding_mode="zeros"``),
factorised: a convolution with the ``r`` kernels ``Vᵀ`` (reshaped to r × C_in × k…), then the
1 × 1 maps ``S`` and ``U``. The dense ``out × (C_in·∏k)`` delta is never formed in the forward.

The matrix is ``W`` = the kernel flattened row-major, n × m = C_out × (C_in·∏k). The input
projection is ``down(x; V) = conv(x, Vᵀ)`` (stride, padding, dilation of the base layer), whose
gradients are torch's ``conv_weight`` / ``conv_input`` (``torch.nn.grad``). String padding is
resolved here: ``"valid"`` is 0; ``"same"`` pads ``d (k − 1)`` in total per dimension, the left
half rounded down, as torch does; when that is uneven the input is padded explicitly
(``F.pad``) and the convolution runs with padding 0. ``ΔW`` in the base weight's layout is the
kernel ``C_out × C_in × k…``; peft's tensors are the kernel ``A`` (r × C_in × k…) and the 1 × 1
kernel ``B`` (C_out × r × 1…), as in peft's LoRA conv, which ignores dilation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn import grad as nn_grad

from .base import GeoLoRALayer

__all__ = ["ConvProjection", "GeoLoRAConv1d", "GeoLoRAConv2d", "resolve_padding"]

_CONV = {1: (F.conv1d, nn_grad.conv1d_weight, nn_grad.conv1d_input)}
_CONV[2] = (F.conv2d, nn_grad.conv2d_weight, nn_grad.conv2d_input)


def resolve_padding(conv: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(symmetric, extra_right)``: the padding per dimension that the convolution applies on
    both sides, and what ``"same"`` adds on the right only (zeros unless uneven)."""
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return (0,) * dims, (0,) * dims
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return tuple(t // 2 for t in totals), tuple(t - 2 * (t // 2) for t in totals)
    return tuple(conv.padding), (0,) * dims


@dataclass(frozen=True)
class ConvProjection:
    """``down(x; V) = conv(x, Vᵀ)`` with numeric padding, channels last."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    in_channels: int

    def kernel(self, v: Tensor) -> Tensor:
        """``Vᵀ`` as ``r`` kernels of shape C_in × k…."""
        return v.t().reshape(v.shape[1], self.in_channels, *self.kernel_size)

    def _geometry(self) -> tuple:
        return self.stride, self.padding, self.dilation

    def down(self, x: Tensor, v: Tensor) -> Tensor:
        conv, _, _ = _CONV[len(self.kernel_size)]
        return conv(x, self.kernel(v), None, *self._geometry()).movedim(1, -1)

    def weight_grad(self, x: Tensor, g: Tensor, v: Tensor) -> Tensor:
        _, conv_weight, _ = _CONV[len(self.kernel_size)]
        shape = (v.shape[1], self.in_channels, *self.kernel_size)
        w = conv_weight(x, shape, g.movedim(-1, 1), *self._geometry())
        return w.reshape(v.shape[1], -1).t()

    def input_grad(self, x: Tensor, g: Tensor, v: Tensor) -> Tensor:
        _, _, conv_input = _CONV[len(self.kernel_size)]
        return conv_input(x.shape, self.kernel(v), g.movedim(-1, 1), *self._geometry())


class _GeoLoRAConv(GeoLoRALayer):
    """Shared by the convolution kinds; ``dims`` is 1 or 2."""

    dims: int
    conv_type: type[nn.Module]

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.conv_type)

    @staticmethod
    def refusal(module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"a convolution with groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return (
                f"a convolution with padding_mode={module.padding_mode!r} (only 'zeros' is "
                "supported)"
            )
        return None

    @staticmethod
    def matrix_shape(module: nn.Module) -> tuple[int, int]:
        return module.out_channels, module.in_channels * math.prod(module.kernel_size)

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        padding, self.extra_right = resolve_padding(base_layer)
        projection = ConvProjection(
            tuple(base_layer.kernel_size),
            tuple(base_layer.stride),
            padding,
            tuple(base_layer.dilation),
            base_layer.in_channels,
        )
        super().__init__(base_layer, projection, **kwargs)

    def prepare_input(self, x: Tensor) -> Tensor:
        x = super().prepare_input(x)
        if any(self.extra_right):
            x = F.pad(x, [p for right in reversed(self.extra_right) for p in (0, right)])
        return x

    def adapter_output(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == self.dims + 1
        out = super().adapter_output(x.unsqueeze(0) if unbatched else x).movedim(-1, 1)
        return out.squeeze(0) if unbatched else out

    def peft_tensors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        kernel_a = a.reshape(a.shape[0], self.projection.in_channels, *self.projection.kernel_size)
        return kernel_a, b.reshape(*b.shape, *(1,) * self.dims)

    def check_peft_exportable(self, name: str) -> None:
        super().check_peft_exportable(name)
        if any(d != 1 for d in self.projection.dilation):
            raise ValueError(
                f"Module {name!r} is a convolution with dilation {self.projection.dilation}; "
                "peft's LoRA conv ignores dilation, so it cannot be exported as peft LoRA."
            )


class GeoLoRAConv1d(_GeoLoRAConv):
    """Adapter on ``nn.Conv1d`` (kernel C_out × C_in × k)."""

    dims, conv_type = 1, nn.Conv1d


class GeoLoRAConv2d(_GeoLoRAConv):
    """Adapter on ``nn.Conv2d`` (kernel C_out × C_in × kh × kw)."""

    dims, conv_type = 2, nn.Conv2d
