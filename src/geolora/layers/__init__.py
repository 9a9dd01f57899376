"""GeoLoRA layers: the protocol (:mod:`.base`), one module per layer kind (:mod:`.linear`,
:mod:`.linear4bit`, :mod:`.conv`, :mod:`.embedding`), the dispatch list (:mod:`.dispatch`) and
the batched factor copies the optimizer uses (:mod:`.stacking`)."""

from .base import GeoLoRALayer, is_factor, random_orthonormal
from .conv import GeoLoRAConv1d, GeoLoRAConv2d
from .dispatch import (
    KINDS,
    SUPPORTED_KINDS,
    is_all_linear_candidate,
    is_peft_layer,
    kind_of,
    wrap_layer,
)
from .embedding import GeoLoRAEmbedding
from .linear import GeoLoRAConv1D, GeoLoRALinear
from .linear4bit import GeoLoRALinear4bit
from .stacking import WHOLE_COPY_BYTES, copy_whole, set_stacked_factors, write_leading

__all__ = [
    "KINDS",
    "SUPPORTED_KINDS",
    "WHOLE_COPY_BYTES",
    "GeoLoRAConv1D",
    "GeoLoRAConv1d",
    "GeoLoRAConv2d",
    "GeoLoRAEmbedding",
    "GeoLoRALayer",
    "GeoLoRALinear",
    "GeoLoRALinear4bit",
    "copy_whole",
    "is_all_linear_candidate",
    "is_factor",
    "is_peft_layer",
    "kind_of",
    "random_orthonormal",
    "set_stacked_factors",
    "wrap_layer",
    "write_leading",
]
