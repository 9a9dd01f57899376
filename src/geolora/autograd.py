"""The adapter's forward ``y = s · ((x V) Sᵀ) Uᵀ`` with a backward that returns the three
gradients the integrator needs, all at the same point and at LoRA's cost (spec §2):

    G_K = s · dyᵀ h            (n × r)   gradient w.r.t. K = U S,   h = down(x; V)
    G_L = s · down'(x; dy U)   (m × r)   gradient w.r.t. L = V Sᵀ
    G_S = s · (dy U)ᵀ h        (r × r)   gradient w.r.t. S

where ``down(x; V)`` is the input projection (``x V`` for a linear layer, a convolution with
kernel ``Vᵀ`` for Conv2d) and ``down'(x; g)`` its weight gradient for output gradient ``g``.
No ``S⁻¹`` is ever formed, so ``S = 0`` at initialisation is no problem. Autograd stores these
tensors in ``U.grad``, ``V.grad`` and ``S.grad``: they are *not* the gradients of ``U`` and ``V``,
and no ordinary optimizer may touch the factors.

Autocast is switched off inside both passes: the adapter runs in the dtype of its factors
(float32 for half-precision base models), so ``G_K``, ``G_L``, ``G_S`` are float32 whatever the
autocast dtype, and the backward sees the same dtypes as the forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn import grad as nn_grad

__all__ = ["ConvGeometry", "adapter_delta"]


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding and dilation of a Conv2d whose input projection is ``down``."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]

    def kernel(self, v: Tensor, in_channels: int) -> Tensor:
        return v.t().reshape(v.shape[1], in_channels, *self.kernel_size)


def _down(x: Tensor, v: Tensor, conv: ConvGeometry | None) -> Tensor:
    """Input projection, channels last: ``x V`` or ``conv2d(x, Vᵀ)``."""
    if conv is None:
        return x @ v
    kernel = conv.kernel(v, x.shape[1])
    out = F.conv2d(x, kernel, None, conv.stride, conv.padding, conv.dilation)
    return out.movedim(1, -1)


def _down_weight_grad(x: Tensor, g: Tensor, v: Tensor, conv: ConvGeometry | None) -> Tensor:
    """Gradient of ``<g, down(x; V)>`` with respect to ``V`` (m × r)."""
    if conv is None:
        return x.reshape(-1, x.shape[-1]).t() @ g.reshape(-1, g.shape[-1])
    shape = conv.kernel(v, x.shape[1]).shape
    w = nn_grad.conv2d_weight(x, shape, g.movedim(-1, 1), conv.stride, conv.padding, conv.dilation)
    return w.reshape(v.shape[1], -1).t()


def _down_input_grad(x: Tensor, g: Tensor, v: Tensor, conv: ConvGeometry | None) -> Tensor:
    """Gradient of ``<g, down(x; V)>`` with respect to ``x``."""
    if conv is None:
        return g @ v.t()
    kernel = conv.kernel(v, x.shape[1])
    return nn_grad.conv2d_input(
        x.shape, kernel, g.movedim(-1, 1), conv.stride, conv.padding, conv.dilation
    )


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device_type`` if it is on (a no-op context otherwise)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _AdapterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u, s, v, scale, conv):  # noqa: D401 - autograd signature
        with _no_autocast(x.device.type):
            h = _down(x, v, conv)
            ctx.save_for_backward(x, u, s, v, h)
            ctx.scale, ctx.conv = scale, conv
            return (h @ s.t()) @ u.t() * scale

    @staticmethod
    def backward(ctx, dy):
        x, u, s, v, h = ctx.saved_tensors
        scale, conv = ctx.scale, ctx.conv
        grad_k = grad_s = grad_l = grad_x = None
        with _no_autocast(dy.device.type):
            dy_u = dy @ u
            h_flat = h.reshape(-1, h.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_k = dy.reshape(-1, dy.shape[-1]).t() @ h_flat * scale
            if ctx.needs_input_grad[2]:
                grad_s = dy_u.reshape(-1, dy_u.shape[-1]).t() @ h_flat * scale
            if ctx.needs_input_grad[3]:
                grad_l = _down_weight_grad(x, dy_u, v, conv) * scale
            if ctx.needs_input_grad[0]:
                grad_x = _down_input_grad(x, (dy_u @ s) * scale, v, conv)
        return grad_x, grad_k, grad_s, grad_l, None, None


def adapter_delta(
    x: Tensor, u: Tensor, s: Tensor, v: Tensor, scale: float, conv: ConvGeometry | None = None
) -> Tensor:
    """``s · U S Vᵀ`` applied to ``x`` (channels last in the result), whose backward puts
    ``G_K``, ``G_S``, ``G_L`` into the gradients of ``u``, ``s`` and ``v``."""
    return _AdapterFunction.apply(x, u, s, v, scale, conv)
