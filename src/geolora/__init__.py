"""geolora: rank-adaptive low-rank adapters trained along the geometry of the low-rank manifold.

GeoLoRA (Schotthöfer et al., ICLR 2025) adapts a weight as ``W = W0 + s·U S Vᵀ`` and moves the
factors with a geometric integrator: one backward pass per step, then a QR basis augmentation and a
small SVD truncation that let each layer's rank grow or shrink by itself.
"""

from .config import GeoLoRAConfig
from .layers import GeoLoRAConv1D, GeoLoRAConv2d, GeoLoRALayer, GeoLoRALinear
from .model import geolora_layers, get_geolora_model, rank_report
from .optimizer import GeoLoRAOptimizer

__version__ = "0.1.0"

__all__ = [
    "GeoLoRAConfig",
    "GeoLoRAConv1D",
    "GeoLoRAConv2d",
    "GeoLoRALayer",
    "GeoLoRALinear",
    "GeoLoRAOptimizer",
    "__version__",
    "geolora_layers",
    "get_geolora_model",
    "rank_report",
]
