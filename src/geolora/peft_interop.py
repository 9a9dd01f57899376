"""Plain peft LoRA adapters from GeoLoRA, and GeoLoRA from peft LoRA adapters (spec §6).

Export: a GeoLoRA layer at rank ``r`` is exactly a LoRA layer of rank ``r``,

    ΔW = s · U S Vᵀ = B A,    B = s · U S  (n × r),    A = Vᵀ  (r × m),

written with ``rank_pattern`` and ``alpha_pattern`` equal to each module's rank, so that peft's
scale ``lora_alpha / r`` is 1 for every module. For ``Conv2d``, ``A`` is the kernel
``r × C_in × kh × kw`` and ``B`` the 1 × 1 kernel ``n × r × 1 × 1``, as in peft's LoRA conv. The
directory is written without peft and loads with ``peft.PeftModel.from_pretrained`` alone.

Import: a peft LoRA layer computes ``ΔW = c · B A`` (``c`` its scaling). With thin QRs
``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` and the SVD ``c · R_B R_Aᵀ = P Σ Qᵀ`` (at most r × r),

    ΔW = (Q_B P) Σ (Q_A Q)ᵀ,    so    U = Q_B P,   V = Q_A Q,   S = Σ / s

at the adapter's rank, with ``s`` the GeoLoRA scale: the GeoLoRA model computes what the peft
model computed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from .config import GeoLoRAConfig
from .io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    geolora_root,
    model_name_or_path,
    saved_module_names,
    write_adapter_dir,
)
from .layers import GeoLoRAConv1D, GeoLoRAConv2d
from .model import find_target_names, geolora_layers, get_geolora_model

__all__ = ["export_peft_lora", "geolora_from_peft"]

PEFT_PREFIX = "base_model.model."
_DEFAULT_R_MAX = next(f.default for f in dataclasses.fields(GeoLoRAConfig) if f.name == "r_max")
# LoraConfig options whose adapters are not a plain ``c · B A`` on the weight.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
)


def exact_targets(model: nn.Module, names: list[str]) -> list[str] | str:
    """``target_modules`` that select exactly ``names`` under the suffix rule shared by peft and
    GeoLoRA: the full names, or an exact regular expression when one of them is also the tail of
    another module's name (as ``"0"`` is of ``"2.0"``)."""
    chosen = set(names)
    others = [n for n, _ in model.named_modules() if n and n not in chosen]
    if any(other.endswith("." + name) for other in others for name in chosen):
        return "(?:" + "|".join(re.escape(name) for name in sorted(chosen)) + ")"
    return sorted(chosen)


def export_peft_lora(
    model: nn.Module, path: str | Path, base_model_name: str | None = None
) -> Path:
    """Write the GeoLoRA adapters of ``model`` as a plain peft LoRA adapter directory (atomically,
    like :func:`geolora.save_adapter`); returns ``path``.

    ``base_model_name`` becomes ``base_model_name_or_path`` (default:
    ``model.config._name_or_path`` when set). Load with
    ``peft.PeftModel.from_pretrained(base_model, path)``.
    """
    root, config = geolora_root(model)
    layers = geolora_layers(root)
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        u, s, v = (t.detach() for t in layer.active_factors())
        b, a = layer.scale * (u @ s), v.t()
        if isinstance(layer, GeoLoRAConv2d):
            if layer.geometry.dilation != (1, 1):
                raise ValueError(
                    f"Module {name!r} is a Conv2d with dilation {layer.geometry.dilation}; peft's "
                    "LoRA conv ignores dilation, so it cannot be exported as peft LoRA."
                )
            a = layer.geometry.kernel(v, layer.base_layer.in_channels)
            b = b[:, :, None, None]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    saved = saved_module_names(root, config)
    for name in saved:
        for key, value in root.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach()
    tensors = {k: t.cpu().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    ranks = {name: layer.current_rank for name, layer in layers.items()}
    # peft takes the first pattern key that matches a name's tail: longest keys first.
    pattern = dict(sorted(ranks.items(), key=lambda item: (-len(item[0]), item[0])))
    top = max(ranks.values())
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name or model_name_or_path(root),
        "r": top,
        "lora_alpha": top,
        "target_modules": exact_targets(root, list(layers)),
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "lora_dropout": config.lora_dropout,
        "fan_in_fan_out": all(isinstance(layer, GeoLoRAConv1D) for layer in layers.values()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    files = {
        WEIGHTS_NAME: save_safetensors(tensors, metadata={"format": "pt"}),
        CONFIG_NAME: json.dumps(peft_config, indent=2).encode(),
    }
    return write_adapter_dir(Path(path), files)


def _svd_of_product(b: Tensor, a: Tensor, c: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, σ, V)`` with ``c · B A = U diag(σ) Vᵀ`` in float64: two thin QRs and a small SVD."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().t())
    p, sigma, qh = torch.linalg.svd(c * (r_b @ r_a.t()), full_matrices=False)
    return q_b @ p, sigma, q_a @ qh.t()


def _peft_factors(peft_model: nn.Module, adapter: str) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    factors = {}
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        base = module.get_base_layer()
        plain_conv = isinstance(base, nn.Conv2d) and base.groups == 1 and base.dilation == (1, 1)
        if not (isinstance(base, (nn.Linear, Conv1D)) or plain_conv):
            raise TypeError(
                f"Module {name!r}: its LoRA sits on a {type(base).__name__}; GeoLoRA starts from "
                "LoRA on nn.Linear, Conv1D and Conv2d (groups=1, dilation=1) only."
            )
        a = module.lora_A[adapter].weight.detach()
        b = module.lora_B[adapter].weight.detach()
        c = float(module.scaling[adapter])
        factors[name] = _svd_of_product(b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1), c)
    if not factors:
        raise ValueError(f"The peft model has no LoRA layers for adapter {adapter!r}.")
    return factors


def _default_config(peft_config, base: nn.Module, factors: dict, saved: list[str]):
    top = max(len(sigma) for _, sigma, _ in factors.values())
    smallest = min(min(u.shape[0], v.shape[0]) for u, _, v in factors.values())
    r_max = max(_DEFAULT_R_MAX, top)
    return GeoLoRAConfig(
        target_modules=exact_targets(base, list(factors)),
        r=min(peft_config.r, r_max, smallest),
        r_max=r_max,
        lora_alpha=float(peft_config.lora_alpha),
        lora_dropout=float(peft_config.lora_dropout),
        use_rslora=bool(peft_config.use_rslora),
        modules_to_save=saved or None,
    )


def geolora_from_peft(
    model: nn.Module,
    adapter_path: str | Path | None = None,
    config: GeoLoRAConfig | None = None,
) -> nn.Module:
    """Start GeoLoRA from a peft LoRA adapter; returns the base model with GeoLoRA layers whose
    outputs equal the peft model's.

    Args:
        model: a ``peft.PeftModel`` holding a LoRA adapter (its active adapter is used), or a
            plain base model together with ``adapter_path``.
        adapter_path: a peft LoRA adapter directory, loaded onto ``model`` with
            ``PeftModel.from_pretrained``.
        config: the GeoLoRA config; it must select exactly the modules that carry LoRA and allow
            each module's LoRA rank (``r_max``). Default: those modules, ``r``, ``lora_alpha``,
            ``lora_dropout``, ``use_rslora`` and ``modules_to_save`` from the LoRA config, and
            ``r_max = max(32, largest LoRA rank)``.

    Every module starts at its LoRA rank (capped by ``min(n, m)``). The peft model is consumed:
    its LoRA layers are removed (``unload``) and the base model is adapted in place.
    """
    try:
        from peft import PeftModel
        from peft.utils import ModulesToSaveWrapper
    except ImportError as err:
        raise ImportError("geolora_from_peft needs peft: pip install 'geolora[hf]'.") from err
    if adapter_path is not None:
        if isinstance(model, PeftModel):
            raise ValueError("Pass a PeftModel, or a base model with adapter_path, not both.")
        model = PeftModel.from_pretrained(model, str(adapter_path))
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"Expected a peft.PeftModel (or a base model with adapter_path), got "
            f"{type(model).__name__}."
        )
    adapter = model.active_adapter
    peft_config = model.peft_config[adapter]
    if str(getattr(peft_config.peft_type, "value", peft_config.peft_type)) != "LORA":
        raise ValueError(f"Only LoRA adapters can be converted, got {peft_config.peft_type}.")
    used = [opt for opt in _UNSUPPORTED if getattr(peft_config, opt, None)]
    if used or peft_config.bias != "none":
        raise ValueError(
            f"This LoRA adapter uses {used or ['bias=' + repr(peft_config.bias)]}, which is not a "
            "plain low-rank weight update; GeoLoRA cannot start from it."
        )
    factors = _peft_factors(model, adapter)
    inner = model.get_base_model()
    saved = [n for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    top = max(len(sigma) for _, sigma, _ in factors.values())
    if config is not None and config.r_max < top:
        raise ValueError(f"The LoRA adapter has rank {top} > r_max={config.r_max}: raise r_max.")
    base = model.unload()
    config = config or _default_config(peft_config, base, factors, saved)
    targets = set(find_target_names(base, config))
    if targets != set(factors):
        raise ValueError(
            f"config.target_modules selects {sorted(targets - set(factors))[:8]} without LoRA "
            f"and misses {sorted(set(factors) - targets)[:8]} with LoRA: pass target_modules "
            "that select exactly the LoRA modules (or config=None)."
        )
    get_geolora_model(base, config)
    for name, layer in geolora_layers(base).items():
        u, sigma, v = factors[name]
        kw = {"device": layer.U.device, "dtype": layer.U.dtype}
        layer.set_factors(u.to(**kw), (sigma / layer.scale).to(**kw), v.to(**kw))
    return base
