"""The adapter layer protocol: a frozen base layer plus the adapter ``ΔW = s · U S Vᵀ``.

Storage: each adapter owns three parameters of fixed size, ``U`` (n × r_max), ``S``
(r_max × r_max) and ``V`` (m × r_max), of which only the leading ``rank`` columns are active. The
parameter objects and their shapes never change while ranks grow and shrink, which is what
torch DDP's reducer, ``torch.compile`` guards and optimizer state dicts need; the forward only
touches the active slice, so compute scales with the current rank. Inactive entries are kept at
zero. ``rank`` is a persistent buffer (saved in state dicts) mirrored by a Python int so that the
forward never syncs with the device.

A layer behaves like the layer it wraps: ``weight``, ``bias`` and every other attribute it does
not define itself (``in_channels``, ``kernel_size``, ``padding_idx``, …) resolve to
``base_layer``, as in peft. ``out_features`` / ``in_features`` are the sizes ``n``, ``m`` of the
matrix the adapter modifies. A layer whose owner reads its weight instead of calling it
(``reads_weight``, set by :mod:`geolora.layers.dispatch`) returns the effective weight
``W0 + ΔW`` from ``weight`` (:func:`geolora.autograd.effective_weight`), so the adapter is never
bypassed.

Each kind (one module per kind) supplies ``(n, m)``, its input projection for the adapter op
(:class:`geolora.autograd.Projection`), the layout of ``ΔW`` in its base weight and its peft
LoRA tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..autograd import Projection, adapter_delta, effective_weight

__all__ = ["GeoLoRALayer", "is_factor", "random_orthonormal"]


def random_orthonormal(n: int, r: int, generator: torch.Generator | None = None) -> Tensor:
    """``n × r`` matrix with orthonormal columns: the Q of a Gaussian matrix's QR."""
    gaussian = torch.randn(n, r, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q


def is_factor(param: Tensor) -> bool:
    """Whether ``param`` is a GeoLoRA factor (U, S or V), which only GeoLoRAOptimizer may step."""
    return getattr(param, "_geolora_factor", False)


class GeoLoRALayer(nn.Module):
    """Base class: ``y = base(x) + s · U S Vᵀ x`` with ``U``, ``V`` orthonormal, ``S`` diagonal.

    The initial rank is ``min(r, r_max')`` and the smallest ``min(r_min, r)``, where
    ``r_max' = min(r_max, n, m)`` caps every rank at what the layer's size allows.
    """

    peft_names: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    """Names of peft's ``A`` and ``B`` tensors of this kind, under the module's name."""

    @staticmethod
    def matrix_shape(module: nn.Module) -> tuple[int, int]:
        """``(n, m)``: the size of the matrix ``W`` an adapter on ``module`` modifies."""
        raise NotImplementedError

    def __init__(
        self,
        base_layer: nn.Module,
        projection: Projection,
        r: int,
        r_max: int,
        r_min: int,
        scale: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        out_features, in_features = self.matrix_shape(base_layer)
        self.out_features, self.in_features = out_features, in_features
        self.projection = projection
        self.r_max = min(r_max, out_features, in_features)
        r = min(r, self.r_max)
        self.r_min = min(r_min, r)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reads_weight = False
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

    # --- the wrapped layer's attributes --------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base layer's weight; ``W0 + ΔW`` (differentiable) when ``reads_weight``."""
        w0 = self.base_layer.weight
        if not self.reads_weight or self.disabled or self.merged:
            return w0
        u, s, v = self.active_factors()
        return effective_weight(w0, u, s, v, self.scale)

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

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

    # --- what each kind supplies ---------------------------------------------------------
    def to_weight_layout(self, delta: Tensor) -> Tensor:
        """``delta`` (n × m) laid out like ``base_layer.weight`` (default: the same)."""
        return delta.reshape(self.base_layer.weight.shape)

    def delta_like_weight(self) -> Tensor:
        """``ΔW`` in the layout and dtype of ``base_layer.weight`` (for merging)."""
        delta = self.to_weight_layout(self.delta_weight().detach())
        return delta.to(self.base_layer.weight.dtype)

    def peft_tensors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """peft's ``A`` and ``B`` tensors (named :attr:`peft_names`) for ``ΔW = B A`` with ``a``
        (r × m) and ``b`` (n × r); the rank is dim 0 of ``A`` and dim 1 of ``B`` for every
        kind. Default: the matrices themselves (peft's LoRA Linear)."""
        return a, b

    def check_peft_exportable(self, name: str) -> None:
        """Raise a ValueError if peft's LoRA layer of this kind cannot represent this adapter: a
        layer whose owner reads its weight would be bypassed by peft's LoRA layer (whose
        ``weight`` is the base weight)."""
        if self.reads_weight:
            raise ValueError(
                f"Module {name!r}: its owner reads {name.rpartition('.')[2]}.weight directly "
                "(nn.MultiheadAttention, or nn.TransformerEncoderLayer's fast path), which would "
                "bypass a peft LoRA layer there. Merge the adapter instead (merge_and_unload), or "
                "train without this module."
            )

    # --- state ---------------------------------------------------------------------------
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
    def prepare_input(self, x: Tensor) -> Tensor:
        """The adapter's input: dropout, in the factors' dtype (embeddings override)."""
        return self.dropout(x).to(self.U.dtype)

    def adapter_output(self, x: Tensor) -> Tensor:
        """``s · U S Vᵀ`` applied to ``x``, shaped like the base layer's output."""
        u, s, v = self.active_factors()
        return adapter_delta(self.prepare_input(x), u, s, v, self.scale, self.projection)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        return result + self.adapter_output(x).to(result.dtype)
