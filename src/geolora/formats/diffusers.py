"""diffusers LoRA export: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(dir)``
and ``unet.load_lora_adapter(dir, prefix="unet")``.

The tensors are peft's (``<prefix>.<module>.lora_A.weight`` = ``Vᵀ``, ``lora_B.weight`` =
``s U S``, kernels for convolutions; :func:`geolora.formats.peft.lora_tensors`) in the serving
layout: every module zero-padded to the largest rank ``R`` and no ``network_alphas``, so diffusers
builds a LoRA config with ``r = lora_alpha = R`` (``diffusers/utils/peft_utils.py``,
``get_peft_kwargs``: without alphas ``lora_alpha`` is the rank) and applies the scale 1 to
``B A`` everywhere: the loaded model computes ``W0 + s · U S Vᵀ``, as the GeoLoRA model does.
Older diffusers releases take one ``lora_alpha`` for modules of different ranks, which is why
the ranks are padded to one. ``modules_to_save`` cannot be expressed in this format.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from ..model import geolora_layers
from ._files import write_adapter_dir
from .peft import lora_tensors

__all__ = ["DIFFUSERS_WEIGHTS_NAME", "export_diffusers_lora"]

DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def export_diffusers_lora(model: nn.Module, path: str | Path, prefix: str = "unet") -> Path:
    """Write the GeoLoRA adapters of ``model`` (a diffusers model such as
    ``UNet2DConditionModel``, adapted with :func:`geolora.get_geolora_model`) to the directory
    ``path`` as ``pytorch_lora_weights.safetensors`` (atomically); returns ``path``.

    ``prefix`` is the pipeline component the weights belong to (``"unet"``, ``"transformer"``).
    """
    from ..io import geolora_root

    root, config = geolora_root(model)
    if config.modules_to_save:
        raise ValueError(
            f"modules_to_save {config.modules_to_save} cannot be written as a diffusers LoRA; "
            "save the full modules separately or train without them."
        )
    layers = geolora_layers(root)
    top = max(layer.current_rank for layer in layers.values())
    tensors = lora_tensors(layers, f"{prefix}.", rank=top)
    tensors = {k: t.cpu().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    blob = save_safetensors(tensors, metadata={"format": "pt"})
    return write_adapter_dir(Path(path), {DIFFUSERS_WEIGHTS_NAME: blob})
