"""Putting GeoLoRA adapters into a model: target matching, injection, and the rank report."""

from __future__ import annotations

import difflib
import re
from typing import Any

from torch import nn

from .config import GeoLoRAConfig
from .layers import GeoLoRALayer, is_all_linear_candidate, is_factor, is_peft_layer, wrap_layer
from .model_methods import attach_model_methods
from .submodules import parent_and_child

__all__ = [
    "adapter_param_count",
    "name_matches",
    "geolora_layers",
    "get_geolora_model",
    "rank_report",
    "trainable_parameter_count",
]


def name_matches(name: str, key: str) -> bool:
    """Whether module ``name`` is selected by ``key`` under peft's suffix rule: ``key`` equals
    the full name or its trailing dotted components."""
    return name == key or name.endswith("." + key)


def _close_names(key: str, names: list[str]) -> list[str]:
    leaves = sorted(
        {part for name in names for part in name.split(".") if part and not part.isdigit()}
    )
    return difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)


def _output_layer_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return {name for name, module in model.named_modules() if out is not None and module is out}


def find_target_names(model: nn.Module, config: GeoLoRAConfig) -> list[str]:
    """Full names of the modules ``config.target_modules`` selects, or a ValueError that lists
    close names for every key that matches nothing."""
    names = [name for name, _ in model.named_modules() if name]
    saved = config.modules_to_save or []
    excluded = config.exclude_modules or []

    def kept(name: str) -> bool:
        parts = name.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        inside_saved = any(name_matches(a, key) for a in ancestors for key in saved)
        return not inside_saved and not any(name_matches(name, key) for key in excluded)

    targets = config.target_modules
    if targets == "all-linear":
        modules = dict(model.named_modules())
        skip = _output_layer_names(model)

        def candidate(name: str) -> bool:
            owner_name, _, child = name.rpartition(".")
            return is_all_linear_candidate(modules[name], modules[owner_name], child)

        chosen = [n for n in names if candidate(n) and n not in skip and kept(n)]
        if not chosen:
            raise ValueError("target_modules='all-linear' found no nn.Linear or Conv1D layer.")
        return chosen
    if isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [n for n in names if pattern.fullmatch(n) and kept(n)]
        if not chosen:
            raise ValueError(
                f"The regex target_modules={targets!r} matches no module (it must match a full "
                f"name such as {names[min(len(names) - 1, 3)]!r})."
            )
        return chosen
    missing = [key for key in targets if not any(name_matches(n, key) for n in names)]
    if missing:
        hints = "; ".join(
            f"{key!r}: did you mean {_close_names(key, names) or 'nothing close'}?"
            for key in missing
        )
        raise ValueError(f"target_modules {missing} match no module of this model. {hints}")
    return [n for n in names if any(name_matches(n, key) for key in targets) and kept(n)]


def get_geolora_model(model: nn.Module, config: GeoLoRAConfig) -> nn.Module:
    """Freeze ``model`` and put a GeoLoRA adapter on every target module, in place.

    The returned model (the same object) has the same forward signature and, at initialisation
    (``S = 0``), exactly the base model's outputs. Modules in ``config.modules_to_save`` are
    trained in full. The config is kept as ``model.geolora_config``; the model gains
    ``print_trainable_parameters()`` and a ``save_pretrained`` that writes the adapter
    (:mod:`geolora.model_methods`).
    """
    if any(isinstance(m, GeoLoRALayer) for m in model.modules()):
        raise ValueError("This model already has GeoLoRA adapters; load or merge them instead.")
    if any(is_peft_layer(m) for m in model.modules()):
        raise TypeError(
            f"This model ({type(model).__name__}) carries peft adapters. Start GeoLoRA from them "
            "with geolora.geolora_from_peft(peft_model) (outputs stay equal), or adapt the base "
            "model (peft_model.unload(), or a freshly loaded one)."
        )
    targets = find_target_names(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        parent, child = parent_and_child(model, name)
        layer = wrap_layer(
            name,
            getattr(parent, child),
            owner=parent,
            r=config.r,
            r_max=config.r_max,
            r_min=config.r_min,
            scale=config.scale,
            dropout=config.lora_dropout,
        )
        setattr(parent, child, layer)
    for key in config.modules_to_save or []:
        found = [m for n, m in model.named_modules() if n and name_matches(n, key)]
        if not found:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(
                f"modules_to_save entry {key!r} matches no module; close names: "
                f"{_close_names(key, names) or 'none'}."
            )
        for module in found:
            module.requires_grad_(True)
    model.geolora_config = config
    attach_model_methods(model)
    return model


def geolora_layers(model: nn.Module) -> dict[str, GeoLoRALayer]:
    """All GeoLoRA layers of ``model`` by module name (works through DDP wrappers too)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GeoLoRALayer)}


def adapter_param_count(layer: GeoLoRALayer) -> int:
    """``r (n + m) + r``: parameters of a rank-r adapter with diagonal ``S`` (spec §5)."""
    r = layer.current_rank
    return r * (layer.out_features + layer.in_features) + r


def trainable_parameter_count(model: nn.Module) -> int:
    """Adapters counted at their current rank, plus every other trainable parameter."""
    layers = geolora_layers(model).values()
    others = sum(p.numel() for p in model.parameters() if p.requires_grad and not is_factor(p))
    return others + sum(adapter_param_count(layer) for layer in layers)


def rank_report(model: nn.Module) -> dict[str, Any]:
    """Current ranks and parameter counts.

    Returns ``{"ranks": {module: int}, "r_max": {module: int}, "total_rank": int,
    "adapter_params": int, "trainable_params": int, "total_params": int}``. Adapter parameters
    count ``r (n + m) + r`` per layer (``S`` diagonal between steps).
    """
    layers = geolora_layers(model)
    return {
        "ranks": {name: layer.current_rank for name, layer in layers.items()},
        "r_max": {name: layer.r_max for name, layer in layers.items()},
        "total_rank": sum(layer.current_rank for layer in layers.values()),
        "adapter_params": sum(adapter_param_count(layer) for layer in layers.values()),
        "trainable_params": trainable_parameter_count(model),
        "total_params": sum(p.numel() for p in model.parameters() if not is_factor(p)),
    }
