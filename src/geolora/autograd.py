"""The adapter's forward ``y = s · ((down(x; V)) Sᵀ) Uᵀ`` with a backward that returns the three
gradients the integrator needs, all at the same point and at LoRA's cost (spec §2):

    G_K = s · dyᵀ h            (n × r)   gradient w.r.t. K = U S,   h = down(x; V)
    G_L = s · down'(x; dy U)   (m × r)   gradient w.r.t. L = V Sᵀ
    G_S = s · (dy U)ᵀ h        (r × r)   gradient w.r.t. S

where ``down(x; V)`` is the input projection of the layer kind (``x V`` for a linear layer, a
convolution with kernel ``Vᵀ`` for a convolution, the rows ``V[x]`` for an embedding; see
:class:`Projection`) and ``down'(x; g)`` its weight gradient for output gradient ``g``.
No ``S⁻¹`` is ever formed, so ``S = 0`` at initialisation is no problem. Autograd stores these
tensors in ``U.grad``, ``V.grad`` and ``S.grad``: they are *not* the gradients of ``U`` and ``V``,
and no ordinary optimizer may touch the factors.

:func:`effective_weight` is the same op for owners that read a layer's weight instead of calling
it (``nn.MultiheadAttention`` reads ``out_proj.weight``): ``W = W0 + s · U S Vᵀ`` formed densely,
whose backward turns the weight gradient ``G`` into ``G_K = s G V``, ``G_L = s Gᵀ U``,
``G_S = s Uᵀ G V``: the same three tensors, so the optimizer cannot tell the routes apart.

Autocast is switched off inside both passes: the adapter runs in the dtype of its factors
(float32 for half-precision base models), so ``G_K``, ``G_L``, ``G_S`` are float32 whatever the
autocast dtype, and the backward sees the same dtypes as the forward.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Projection", "adapter_delta", "column_major", "effective_weight", "thin_weight_grad"]


def column_major(thin: Tensor) -> Tensor:
    """``thin`` (k × r) as a column-major copy (a transposed view of a contiguous r × k).

    CPU BLAS multiplies a tall ``T × k`` matrix by a thin ``k × r`` one 2–3× faster when the thin
    one is column-major (each of its ``r`` columns contiguous) than when it is a row-major slice
    of the ``r_max``-wide factor (640 × 384 by 384 × 8: 115 µs against 285 µs on one core), and
    the copy costs 4 µs. The same holds for the weight gradients ``Xᵀ G`` (``X``: T × k, ``G``:
    T × r), which :func:`thin_weight_grad` forms as ``(Gᵀ X)ᵀ``."""
    return thin.t().contiguous().t()


def thin_weight_grad(x: Tensor, g: Tensor) -> Tensor:
    """``Xᵀ G`` (k × r) for ``X`` (…, k) and ``G`` (…, r), all leading dimensions summed, formed
    as ``(Gᵀ X)ᵀ``: the same product, 3–4× faster on CPU BLAS for a thin ``G`` (see
    :func:`column_major`)."""
    return (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).t()


class Projection(Protocol):
    """The input projection ``h = down(x; V)`` of one layer kind, channels last (``… × r``)."""

    def down(self, x: Tensor, v: Tensor) -> Tensor:
        """``h = down(x; V)``."""
        ...

    def weight_grad(self, x: Tensor, g: Tensor, v: Tensor) -> Tensor:
        """Gradient of ``<g, down(x; V)>`` with respect to ``V`` (m × r)."""
        ...

    def input_grad(self, x: Tensor, g: Tensor, v: Tensor) -> Tensor | None:
        """Gradient of ``<g, down(x; V)>`` with respect to ``x`` (None: ``x`` holds indices)."""
        ...


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device_type`` if it is on (a no-op context otherwise)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _AdapterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u, s, v, scale, projection):  # noqa: D401 - autograd signature
        with _no_autocast(x.device.type):
            h = projection.down(x, v)
            ctx.save_for_backward(x, u, s, v, h)
            ctx.scale, ctx.projection = scale, projection
            return (h @ (s.t() * scale)) @ u.t()  # s scales the r × r factor, not the output

    @staticmethod
    def backward(ctx, dy):
        x, u, s, v, h = ctx.saved_tensors
        scale, projection = ctx.scale, ctx.projection
        grad_k = grad_s = grad_l = grad_x = None
        with _no_autocast(dy.device.type):
            dy_u = dy @ column_major(u)
            if ctx.needs_input_grad[1]:
                grad_k = thin_weight_grad(dy, h) * scale
            if ctx.needs_input_grad[2]:
                grad_s = dy_u.reshape(-1, dy_u.shape[-1]).t() @ h.reshape(-1, h.shape[-1]) * scale
            if ctx.needs_input_grad[3]:
                grad_l = projection.weight_grad(x, dy_u, v) * scale
            if ctx.needs_input_grad[0]:
                grad_x = projection.input_grad(x, (dy_u @ s) * scale, v)
        return grad_x, grad_k, grad_s, grad_l, None, None


def adapter_delta(
    x: Tensor, u: Tensor, s: Tensor, v: Tensor, scale: float, projection: Projection
) -> Tensor:
    """``s · U S Vᵀ`` applied to ``x`` through ``projection`` (channels last in the result),
    whose backward puts ``G_K``, ``G_S``, ``G_L`` into the gradients of ``u``, ``s`` and ``v``."""
    return _AdapterFunction.apply(x, u, s, v, scale, projection)


class _EffectiveWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w0, u, s, v, scale):  # noqa: D401 - autograd signature
        with _no_autocast(w0.device.type):
            ctx.save_for_backward(u, s, v)
            ctx.scale, ctx.dtype = scale, w0.dtype
            return w0 + ((u @ s) @ v.t() * scale).to(w0.dtype)

    @staticmethod
    def backward(ctx, grad_w):
        u, s, v = ctx.saved_tensors
        scale = ctx.scale
        with _no_autocast(grad_w.device.type):
            g = grad_w.to(u.dtype)
            g_v = g @ column_major(v)
            grad_k = g_v * scale if ctx.needs_input_grad[1] else None
            grad_s = u.t() @ g_v * scale if ctx.needs_input_grad[2] else None
            grad_l = g.t() @ column_major(u) * scale if ctx.needs_input_grad[3] else None
        grad_w0 = grad_w if ctx.needs_input_grad[0] else None
        return grad_w0, grad_k, grad_s, grad_l, None


def effective_weight(w0: Tensor, u: Tensor, s: Tensor, v: Tensor, scale: float) -> Tensor:
    """``W0 + s · U S Vᵀ`` (out × in, dtype of ``w0``) whose backward puts ``G_K``, ``G_S``,
    ``G_L`` of the weight gradient into the gradients of ``u``, ``s`` and ``v`` (module doc)."""
    return _EffectiveWeight.apply(w0, u, s, v, scale)
