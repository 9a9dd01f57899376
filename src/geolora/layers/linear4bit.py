"""The 4-bit linear kind: an adapter on bitsandbytes' ``Linear4bit`` (QLoRA-style bases).

The frozen base holds ``Q(W0)``, the blockwise NF4/FP4 quantization of ``W0`` (out × in), packed as
``(out · in / 2, 1)``; ``in_features``/``out_features`` give the true shape, and the adapter is the
linear one, ``s · x V Sᵀ Uᵀ`` in float32 (:mod:`geolora.quantized` makes such bases). Merging is
refused while the base is 4-bit: adding ``ΔW`` to ``Q(W0)`` would round it a second time;
:func:`geolora.quantized.dequantize_model` turns the bases into float layers first, after which
this layer merges like any linear one.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..quantized import is_4bit
from .linear import GeoLoRALinear

__all__ = ["GeoLoRALinear4bit"]


class GeoLoRALinear4bit(GeoLoRALinear):
    """Adapter on ``bitsandbytes.nn.Linear4bit`` (checked before ``nn.Linear``, its parent)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return is_4bit(module)

    def delta_like_weight(self) -> Tensor:
        if is_4bit(self.base_layer):
            raise ValueError(
                "Cannot merge an adapter into a 4-bit base layer (it would be rounded again): "
                "call geolora.quantized.dequantize_model(model) first, then merge."
            )
        return super().delta_like_weight()
