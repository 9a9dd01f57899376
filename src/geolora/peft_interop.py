"""GeoLoRA from peft LoRA adapters (spec §6); the export lives in :mod:`geolora.formats.peft`.

Import: a peft LoRA layer computes ``ΔW = c · B A`` (``c`` its scaling). With thin QRs
``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` and the SVD ``c · R_B R_Aᵀ = P Σ Qᵀ`` (at most r × r),

    ΔW = (Q_B P) Σ (Q_A Q)ᵀ,    so    U = Q_B P,   V = Q_A Q,   S = Σ / s

at the adapter's rank, with ``s`` the GeoLoRA scale: the GeoLoRA model computes what the peft
model computed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import GeoLoRAConfig
from .formats.peft import exact_targets, export_peft_lora
from .layers import kind_of
from .model import find_target_names, geolora_layers, get_geolora_model
from .submodules import replace_submodule

__all__ = ["export_peft_lora", "geolora_from_peft"]  # export: geolora.formats.peft

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


def _svd_of_product(b: Tensor, a: Tensor, c: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, σ, V)`` with ``c · B A = U diag(σ) Vᵀ`` in float64: two thin QRs and a small SVD."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().t())
    p, sigma, qh = torch.linalg.svd(c * (r_b @ r_a.t()), full_matrices=False)
    return q_b @ p, sigma, q_a @ qh.t()


def _peft_tensor(module: nn.Module, name: str, adapter: str) -> Tensor:
    """The tensor ``name`` (``"lora_A.weight"``, ``"lora_embedding_A"``, …) of ``adapter``."""
    container, _, attribute = name.partition(".")
    value = getattr(module, container)[adapter]
    return (getattr(value, attribute) if attribute else value).detach()


def _peft_factors(peft_model: nn.Module, adapter: str) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    from peft.tuners.lora import LoraLayer

    factors = {}
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.r:
            continue
        base = module.get_base_layer()
        kind = kind_of(base)
        refusal = getattr(kind, "refusal", lambda _: None)(base) if kind else None
        if kind is None or refusal or any(d != 1 for d in getattr(base, "dilation", (1,))):
            raise TypeError(
                f"Module {name!r}: its LoRA sits on a {type(base).__name__} "
                f"{'(' + refusal + ')' if refusal else ''}that GeoLoRA cannot adapt like peft "
                "does (convolutions: groups=1, dilation=1)."
            )
        a, b = (_peft_tensor(module, part, adapter) for part in kind.peft_names)
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
    trained = {  # the adapter's own copies of the modules_to_save
        n: m.modules_to_save[adapter]
        for n, m in model.get_base_model().named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    }
    saved = list(trained)
    top = max(len(sigma) for _, sigma, _ in factors.values())
    if config is not None and config.r_max < top:
        raise ValueError(f"The LoRA adapter has rank {top} > r_max={config.r_max}: raise r_max.")
    base = model.unload()
    for name, module in trained.items():  # peft >= 0.22's unload puts the original module back
        replace_submodule(base, name, module)
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
