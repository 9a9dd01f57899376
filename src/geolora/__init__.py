"""geolora: rank-adaptive low-rank adapters trained along the geometry of the low-rank manifold.

GeoLoRA (Schotthöfer et al., ICLR 2025) adapts a weight as ``W = W0 + s·U S Vᵀ`` and moves the
factors with a geometric integrator: one backward pass per step, then a QR basis augmentation and a
small SVD truncation that let each layer's rank grow or shrink by itself.
"""

from typing import Any

from .checkpoint import load_training_checkpoint, save_training_checkpoint
from .config import GeoLoRAConfig
from .formats.diffusers import export_diffusers_lora
from .io import AdapterError, load_adapter, save_adapter
from .layers import (
    GeoLoRAConv1D,
    GeoLoRAConv1d,
    GeoLoRAConv2d,
    GeoLoRAEmbedding,
    GeoLoRALayer,
    GeoLoRALinear,
)
from .merge import disable_adapter, merge_adapter, merge_and_unload, unmerge_adapter
from .model import geolora_layers, get_geolora_model, rank_report
from .model_methods import print_trainable_parameters
from .optim.optimizer import GeoLoRAOptimizer
from .peft_interop import export_peft_lora, geolora_from_peft
from .reports import (
    RankHistory,
    format_rank_table,
    plot_rank_heatmap,
    plot_rank_history,
    write_rank_report,
)

__version__ = "0.1.0"

# The transformers Trainer integration needs transformers (the ``hf`` extra): imported on use.
_TRAINER_NAMES = (
    "GeoLoRACallback",
    "add_geolora_callback",
    "check_optimizer",
    "create_geolora_optimizer",
)


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'geolora' has no attribute {name!r}")


__all__ = [
    "AdapterError",
    "GeoLoRAConfig",
    "GeoLoRAConv1D",
    "GeoLoRAConv1d",
    "GeoLoRAConv2d",
    "GeoLoRAEmbedding",
    "GeoLoRALayer",
    "GeoLoRALinear",
    "GeoLoRAOptimizer",
    "RankHistory",
    "__version__",
    "disable_adapter",
    "export_diffusers_lora",
    "export_peft_lora",
    "format_rank_table",
    "geolora_from_peft",
    "geolora_layers",
    "get_geolora_model",
    "load_adapter",
    "load_training_checkpoint",
    "merge_adapter",
    "merge_and_unload",
    "plot_rank_heatmap",
    "plot_rank_history",
    "print_trainable_parameters",
    "rank_report",
    "save_adapter",
    "save_training_checkpoint",
    "unmerge_adapter",
    "write_rank_report",
    *_TRAINER_NAMES,
]
