"""The one place that decides what can be adapted: the ordered list of layer kinds, the owners
that read a child's weight instead of calling it, and the refusals.

A module gets the first kind in :data:`KINDS` whose ``matches`` accepts it (transformers'
``Conv1D`` and bitsandbytes' ``Linear4bit`` before ``nn.Linear``, so a subclass never lands on
its parent's kind). A kind may
refuse a configuration it cannot follow (``refusal``); peft's own LoRA layers are refused with a
pointer to :func:`geolora.geolora_from_peft`.

Owners in :data:`WEIGHT_READERS` compute with a child's ``weight`` directly:
``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward`` and
``nn.TransformerEncoderLayer``'s inference fast path passes ``linear1.weight`` and
``linear2.weight`` to a fused kernel. Such children are adapted with ``reads_weight`` set, so
their ``weight`` is ``W0 + ΔW`` and the adapter is applied on either route.
``target_modules="all-linear"`` leaves ``out_proj`` of ``nn.MultiheadAttention`` out (its
adapter forms the dense ``ΔW`` in every forward and gets no dropout); name it to adapt it.
"""

from __future__ import annotations

from torch import nn

from .base import GeoLoRALayer
from .conv import GeoLoRAConv1d, GeoLoRAConv2d
from .embedding import GeoLoRAEmbedding
from .linear import GeoLoRAConv1D, GeoLoRALinear, is_transformers_conv1d
from .linear4bit import GeoLoRALinear4bit

__all__ = [
    "KINDS",
    "SUPPORTED_KINDS",
    "WEIGHT_READERS",
    "is_all_linear_candidate",
    "is_peft_layer",
    "kind_of",
    "wrap_layer",
]

KINDS: tuple[type[GeoLoRALayer], ...] = (
    GeoLoRAConv1D,
    GeoLoRALinear4bit,
    GeoLoRALinear,
    GeoLoRAConv2d,
    GeoLoRAConv1d,
    GeoLoRAEmbedding,
)
SUPPORTED_KINDS = (
    "nn.Linear, transformers' Conv1D, bitsandbytes' Linear4bit, nn.Conv1d and nn.Conv2d "
    "(groups=1, padding_mode='zeros') "
    "and nn.Embedding"
)
WEIGHT_READERS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
    nn.TransformerEncoderLayer: ("linear1", "linear2"),
}
_LEFT_OUT_OF_ALL_LINEAR: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
}


def is_peft_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft model or one of peft's adapter layers."""
    return type(module).__module__.split(".")[0] == "peft"


def kind_of(module: nn.Module) -> type[GeoLoRALayer] | None:
    """The GeoLoRA layer kind for ``module``, or None if no kind adapts it."""
    return next((kind for kind in KINDS if kind.matches(module)), None)


def _listed(table: dict[type[nn.Module], tuple[str, ...]], owner: nn.Module | None, child: str):
    return owner is not None and any(
        isinstance(owner, cls) and child in names for cls, names in table.items()
    )


def is_all_linear_candidate(module: nn.Module, owner: nn.Module | None, child: str) -> bool:
    """Whether ``target_modules="all-linear"`` selects ``module`` (child ``child`` of ``owner``):
    an ``nn.Linear`` or ``Conv1D`` that is not left out (module doc)."""
    linear = isinstance(module, nn.Linear) or is_transformers_conv1d(module)
    return linear and not _listed(_LEFT_OUT_OF_ALL_LINEAR, owner, child)


def wrap_layer(
    name: str, module: nn.Module, owner: nn.Module | None = None, **kwargs
) -> GeoLoRALayer:
    """Wrap ``module`` (the child named after the last dot of ``name`` in ``owner``) in its
    GeoLoRA kind, or raise a TypeError naming the module and what to change."""
    if is_peft_layer(module):
        raise TypeError(
            f"Module {name!r} is peft's {type(module).__name__}: this model already carries peft "
            "adapters. Start GeoLoRA from them with geolora.geolora_from_peft(peft_model), or "
            "adapt the base model (peft_model.unload() or a fresh one)."
        )
    kind = kind_of(module)
    if kind is None:
        raise TypeError(
            f"Module {name!r} is a {type(module).__name__}, which GeoLoRA cannot adapt; "
            f"supported are {SUPPORTED_KINDS}. Remove it from target_modules."
        )
    refusal = getattr(kind, "refusal", lambda _: None)(module)
    if refusal:
        raise TypeError(f"Module {name!r} is {refusal}. Remove it from target_modules.")
    layer = kind(module, **kwargs)
    layer.reads_weight = _listed(WEIGHT_READERS, owner, name.rpartition(".")[2])
    return layer
