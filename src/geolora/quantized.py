"""4-bit frozen bases (QLoRA-style) with bitsandbytes ``Linear4bit``.

A base ``nn.Linear`` with weight ``W0`` (out × in) is replaced by a ``bnb.nn.Linear4bit`` holding
``Q(W0)``, its blockwise NF4 (or FP4) quantization: 4 bits per entry plus one absmax scale per
block of 64. Its forward computes ``x Q(W0)ᵀ + b`` in ``compute_dtype``; the GeoLoRA adapter on top
stays in float32 and adds ``s · x V Sᵀ Uᵀ`` as on any linear layer (``Linear4bit`` subclasses
``nn.Linear``, and its ``in_features``/``out_features`` say the true shape, while the packed weight
has shape ``(out · in / 2, 1)``). bitsandbytes' bfloat16 CPU inference path is switched off on
the layers made here, so that evaluation computes what training computed.

The adapter cannot be merged into ``Q(W0)`` without a second rounding, so merging is refused on a
4-bit layer; :func:`dequantize_model` first replaces every ``Linear4bit`` by an ``nn.Linear``
with the dequantized weight ``Q(W0)`` (the weight the adapter was trained against), after which
merging is exact.

Needs ``bitsandbytes`` (the ``quant`` extra); runs on CPU with the pinned torch wheel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .submodules import replace_submodule

__all__ = ["dequantize_model", "dequantized_weight", "is_4bit", "quantize_linear_layers"]


def _bnb():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "4-bit bases need bitsandbytes: pip install --no-deps bitsandbytes "
            "(it needs only torch, numpy and packaging)."
        ) from err
    return bitsandbytes


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (checked without importing bnb)."""
    return any(
        cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")
        for cls in type(module).__mro__
    )


def dequantized_weight(module: nn.Module) -> Tensor:
    """``Q(W0)`` of a ``Linear4bit`` as a float tensor (out × in), in its compute dtype."""
    bnb = _bnb()
    module.state_dict()  # undoes bitsandbytes' CPU inference repacking, if it happened
    weight = module.weight
    dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return dense.reshape(module.out_features, module.in_features)


def _output_layer(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out() if callable(get_out) else None


@torch.no_grad()
def quantize_linear_layers(
    model: nn.Module,
    skip: list[str] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    quant_type: str = "nf4",
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` by a frozen 4-bit ``Linear4bit``, in place,
    except the output layer (``lm_head``) and modules inside a ``skip`` name (suffix match, as
    ``modules_to_save``). Returns the names of the quantized layers. Call before adding
    adapters. The float tensors that remain are copied into storage of their own
    (:func:`_own_storage`), so that the float checkpoint can leave memory."""
    bnb = _bnb()
    skip = skip or []
    output = _output_layer(model)
    chosen = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is output:
            continue
        parts = name.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(a == key or a.endswith("." + key) for a in ancestors for key in skip):
            continue
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            quant_type=quant_type,
        )
        layer.weight = bnb.nn.Params4bit(
            module.weight.data.to(torch.float32).contiguous(),
            requires_grad=False,
            quant_type=quant_type,
        )
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        layer = layer.to(module.weight.device)  # quantizes the weight
        # bitsandbytes' CPU inference path repacks the weight and computes in bfloat16 (for
        # in_features divisible by 64): off, so that evaluation computes what training computed.
        layer.support_avx512bf16_for_cpu = False
        replace_submodule(model, name, layer)
        chosen.append(name)
    _own_storage(model)
    return chosen


@torch.no_grad()
def _own_storage(model: nn.Module) -> None:
    """Copy the parameters and buffers that stay in float into storage of their own. Loaded
    from safetensors they are views of one memory map of the whole checkpoint file, which
    would keep the float weights of the quantized layers resident too."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype.is_floating_point:
            tensor.data = tensor.data.clone()


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every ``Linear4bit`` of ``model`` (also inside GeoLoRA layers) by an
    ``nn.Linear`` holding ``Q(W0)`` in ``dtype``, in place; returns their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not is_4bit(module):
            continue
        dense = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            dtype=dtype,
            device=module.weight.device,
        )
        dense.weight.data.copy_(dequantized_weight(module).to(dtype))
        if module.bias is not None:
            dense.bias.data.copy_(module.bias.data.to(dtype))
        dense.requires_grad_(False)
        replace_submodule(model, name, dense)
        replaced.append(name)
    return replaced
