"""GeoLoRA layers: the protocol (:mod:`.base`), one module per layer kind (:mod:`.linear`,
:mod:`.linear4bit`, :mod:`.conv`, :mod:`.embedding`) and the dispatch list (:mod:`.dispatch`); the
batched factor copies the optimizer uses live in :mod:`geolora.optim.stacking`."""

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

__all__ = [
    "KINDS",
    "SUPPORTED_KINDS",
    "GeoLoRAConv1D",
    "GeoLoRAConv1d",
    "GeoLoRAConv2d",
    "GeoLoRAEmbedding",
    "GeoLoRALayer",
    "GeoLoRALinear",
    "GeoLoRALinear4bit",
    "is_all_linear_candidate",
    "is_factor",
    "is_peft_layer",
    "kind_of",
    "random_orthonormal",
    "wrap_layer",
]
