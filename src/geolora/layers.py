"""GeoLoRA layers: a frozen base layer plus the adapter ``s · U S Vᵀ``.

Storage: each adapter owns three parameters of fixed size, ``U`` (n × r_max), ``S``
(r_max × r_max) and ``V`` (m × r_max), of which only the leading ``rank`` columns are active. The
parameter objects and their shapes never change while ranks grow and shrink, which is what
torch DDP's reducer, ``torch.compile`` guards and optimizer state dicts need; the forward only
touches the active slice, so compute scales with the current rank. Inactive entries are kept at
zero. ``rank`` is a persistent buffer (saved in state dicts) mirrored by a Python int so that the
forward never syncs with the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .autograd import ConvGeometry, adapter_delta

__all__ = [
    "is_factor",
    "GeoLoRALayer",
    "GeoLoRALinear",
    "GeoLoRAConv1D",
    "GeoLoRAConv2d",
    "WHOLE_COPY_BYTES",
    "copy_whole",
    "set_stacked_factors",
    "wrap_layer",
    "write_leading",
]


def random_orthonormal(n: int, r: int, generator: torch.Generator | None = None) -> Tensor:
    """``n × r`` matrix with orthonormal columns: the Q of a Gaussian matrix's QR."""
    gaussian = torch.randn(n, r, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q


def is_factor(param: Tensor) -> bool:
    """Whether ``param`` is a GeoLoRA factor (U, S or V), which only GeoLoRAOptimizer may step."""
    return getattr(param, "_geolora_factor", False)


class GeoLoRALayer(nn.Module):
    """Base class: ``y = base(x) + s · U S Vᵀ x`` with ``U``, ``V`` orthonormal, ``S`` diagonal."""

    def __init__(
        self,
        base_layer: nn.Module,
        out_features: int,
        in_features: int,
        r: int,
        r_max: int,
        r_min: int,
        scale: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = out_features, in_features
        self.r_max = min(r_max, out_features, in_features)
        if r > self.r_max:
            raise ValueError(
                f"initial rank r={r} exceeds min(out, in) = {min(out_features, in_features)} of "
                f"this {type(base_layer).__name__}: lower r or exclude the module."
            )
        self.r_min = r_min
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        kw = {"device": weight.device, "dtype": dtype}
        self.U = nn.Parameter(torch.zeros(out_features, self.r_max, **kw))
        self.S = nn.Parameter(torch.zeros(self.r_max, self.r_max, **kw))
        self.V = nn.Parameter(torch.zeros(in_features, self.r_max, **kw))
        self._mark_factors()
        self.register_buffer("rank", torch.tensor(r, dtype=torch.long))
        self._rank = r
        self.disabled = False
        self.merged = False  # delta added into base_layer.weight (geolora.merge)
        with torch.no_grad():
            self.U[:, :r] = random_orthonormal(out_features, r).to(**kw)
            self.V[:, :r] = random_orthonormal(in_features, r).to(**kw)

    # --- factors -------------------------------------------------------------------------
    @property
    def current_rank(self) -> int:
        return self._rank

    def active_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """The active ``(U, S, V)``: n × r, r × r, m × r (views of the parameters)."""
        r = self._rank
        return self.U[:, :r], self.S[:r, :r], self.V[:, :r]

    @torch.no_grad()
    def set_factors(self, u: Tensor, s: Tensor, v: Tensor) -> None:
        """Write new factors of rank ``r = u.shape[1]`` (``s`` a vector of singular values or an
        r × r matrix) and zero the inactive part."""
        r = u.shape[-1]
        if not 1 <= r <= self.r_max:
            raise ValueError(f"rank {r} outside [1, {self.r_max}] for this layer.")
        self.U.zero_()
        self.S.zero_()
        self.V.zero_()
        self.U[:, :r] = u
        self.V[:, :r] = v
        if s.dim() == 1:
            self.S[:r, :r] = torch.diag(s)
        else:
            self.S[:r, :r] = s
        self.rank.fill_(r)
        self._rank = r

    def delta_weight(self) -> Tensor:
        """The dense adapter ``s · U S Vᵀ`` (out × in); for merging and tests, not the forward."""
        u, s, v = self.active_factors()
        return self.scale * (u @ s @ v.t())

    def _apply(self, fn, recurse=True):
        """``model.to(torch.bfloat16)`` / ``model.half()`` cast the base layer but keep the factors
        in their float32/float64 values (moved to the new device): QR and SVD need them, as at
        injection."""
        before = {name: getattr(self, name).data for name in ("U", "S", "V")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            param = getattr(self, name)
            if param.dtype not in (torch.float32, torch.float64):
                param.data = old.to(device=param.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rank = int(self.rank)

    def _mark_factors(self) -> None:
        for factor in (self.U, self.S, self.V):
            factor._geolora_factor = True  # see is_factor()

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and pickle rebuild parameters without their attributes: mark them again
        super().__setstate__(state)
        self._mark_factors()

    def extra_repr(self) -> str:
        return f"rank={self._rank}, r_max={self.r_max}, scale={self.scale:g}"

    # --- forward -------------------------------------------------------------------------
    def adapter_output(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.disabled or self.merged:
            return result
        return result + self.adapter_output(x).to(result.dtype)

    def _factors_for(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        u, s, v = self.active_factors()
        return self.dropout(x).to(u.dtype), u, s, v


class GeoLoRALinear(GeoLoRALayer):
    """Adapter on ``nn.Linear`` (weight out × in)."""

    def __init__(self, base_layer: nn.Linear, **kwargs) -> None:
        super().__init__(base_layer, base_layer.out_features, base_layer.in_features, **kwargs)

    def adapter_output(self, x: Tensor) -> Tensor:
        x, u, s, v = self._factors_for(x)
        return adapter_delta(x, u, s, v, self.scale)


class GeoLoRAConv1D(GeoLoRALayer):
    """Adapter on transformers' ``Conv1D`` (GPT-2; weight stored in × out, ``y = x W + b``)."""

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        in_features, out_features = base_layer.weight.shape
        super().__init__(base_layer, out_features, in_features, **kwargs)

    adapter_output = GeoLoRALinear.adapter_output


class GeoLoRAConv2d(GeoLoRALayer):
    """Adapter on ``nn.Conv2d`` with ``groups == 1``, factorised: a conv with the ``r`` kernels
    ``Vᵀ`` (reshaped to r × C_in × kh × kw), then the 1×1 maps ``S`` and ``U``. The dense
    ``out × (C_in·kh·kw)`` delta is never formed in the forward."""

    def __init__(self, base_layer: nn.Conv2d, **kwargs) -> None:
        if base_layer.groups != 1:
            raise TypeError(
                f"GeoLoRA supports Conv2d with groups=1 only, got groups={base_layer.groups}."
            )
        if base_layer.padding_mode != "zeros":
            raise TypeError(
                f"GeoLoRA supports Conv2d padding_mode='zeros' only, "
                f"got {base_layer.padding_mode!r}."
            )
        in_features = base_layer.in_channels * math.prod(base_layer.kernel_size)
        super().__init__(base_layer, base_layer.out_channels, in_features, **kwargs)
        self.geometry = ConvGeometry(
            tuple(base_layer.kernel_size),
            tuple(base_layer.stride),
            base_layer.padding
            if isinstance(base_layer.padding, str)
            else tuple(base_layer.padding),
            tuple(base_layer.dilation),
        )

    def adapter_output(self, x: Tensor) -> Tensor:
        x, u, s, v = self._factors_for(x)
        return adapter_delta(x, u, s, v, self.scale, self.geometry).movedim(-1, 1)


WHOLE_COPY_BYTES = 16 * 1024
"""Batched reads and writes of fixed-size tensors (factors, optimizer state) copy whole tensors,
one call for many layers, when the inactive part is smaller than this; otherwise they use one
view of the leading part per tensor, which costs a Python call each but moves far less memory."""


def copy_whole(t: Tensor, rows: int, cols: int) -> bool:
    """Whether to copy all of ``t`` rather than its leading ``rows × cols`` part (see
    :data:`WHOLE_COPY_BYTES`)."""
    return (t.numel() - rows * cols) * t.element_size() < WHOLE_COPY_BYTES


@torch.no_grad()
def write_leading(targets: Sequence[Sequence[Tensor]], sources: Sequence[Tensor]) -> None:
    """For each ``j``, write ``sources[j][i]`` (a stack along dim 0) into the leading rows and
    columns of the fixed-size tensor ``targets[j][i]``. The rest of each target must already be
    zero (the storage invariant, when the sources are at least as wide as the active part); it
    is left alone or, for whole-tensor copies, written as zeros again."""
    whole, whole_src, part, part_src = [], [], [], []
    for ts, x in zip(targets, sources):
        rows, cols = x.shape[-2:]
        if copy_whole(ts[0], rows, cols):
            whole += ts
            pad = (0, ts[0].shape[-1] - cols, 0, ts[0].shape[-2] - rows)
            whole_src += nn.functional.pad(x, pad).unbind()
        else:
            part += [t[:rows, :cols] for t in ts]
            part_src += x.unbind()
    if whole or part:
        torch._foreach_copy_(whole + part, whole_src + part_src)


@torch.no_grad()
def set_stacked_factors(
    layers: Sequence[GeoLoRALayer], u: Tensor, s: Tensor, v: Tensor, ranks: Sequence[int]
) -> None:
    """Write the factors of layers of one shape at once: ``u`` (B, n, k), ``s`` (B, k, k) and
    ``v`` (B, m, k), already zero beyond each layer's new rank ``ranks[i]`` (the batched
    counterpart of :meth:`GeoLoRALayer.set_factors`). ``k`` must be at least every layer's current
    rank, so that all of the old active part is overwritten."""
    k = u.shape[-1]
    if any(layer.current_rank > k for layer in layers) or not all(1 <= r <= k for r in ranks):
        raise ValueError(
            f"Stacked factors of width {k} must cover every layer's current rank "
            f"({max(layer.current_rank for layer in layers)}) and the new ranks {list(ranks)} "
            f"(1 ≤ r ≤ {k}): pass wider factors."
        )
    factors = [[getattr(layer, name) for layer in layers] for name in ("U", "S", "V")]
    write_leading(factors, [u, s, v])
    for layer, r in zip(layers, ranks):
        layer.rank.fill_(r)
        layer._rank = r


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return False
    return isinstance(module, Conv1D)


SUPPORTED_TYPES = "nn.Linear, nn.Conv2d (groups=1) and transformers' Conv1D"


def wrap_layer(name: str, module: nn.Module, **kwargs) -> GeoLoRALayer:
    """Wrap a supported layer in the matching GeoLoRA layer, or raise a TypeError naming it."""
    if isinstance(module, nn.Linear):
        return GeoLoRALinear(module, **kwargs)
    if isinstance(module, nn.Conv2d):
        return GeoLoRAConv2d(module, **kwargs)
    if _is_conv1d(module):
        return GeoLoRAConv1D(module, **kwargs)
    raise TypeError(
        f"Module {name!r} is a {type(module).__name__}, which GeoLoRA cannot adapt; supported are "
        f"{SUPPORTED_TYPES}. Remove it from target_modules."
    )
