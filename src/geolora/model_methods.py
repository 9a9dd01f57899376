"""Methods a GeoLoRA model gains at injection, as a peft model has them:

* ``model.print_trainable_parameters()``: peft's one-line summary, adapters counted at their
  current rank, ``r (n + m) + r`` each (see :func:`geolora.model.trainable_parameter_count`);
* ``model.save_pretrained(directory)`` (models that have ``save_pretrained``: transformers,
  diffusers): writes the GeoLoRA adapter (:func:`geolora.save_adapter`'s two files, the
  ``modules_to_save`` included) into ``directory`` instead of the base model, so that
  ``Trainer.save_model()`` and every Trainer checkpoint hold the adapter. Other files in the
  directory (a Trainer's optimizer state, a tokenizer) are left alone.

They are instance attributes (``functools.partial``), so the model's class is unchanged, and
:func:`geolora.merge_and_unload` removes them again.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from torch import nn

from .layers import is_factor

__all__ = ["attach_model_methods", "detach_model_methods", "print_trainable_parameters"]

_METHODS = ("print_trainable_parameters", "save_pretrained")


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: T || all params: A || trainable%: P`` (peft's format): ``T``
    counts the adapters at their current ranks plus the other trainable parameters, ``A`` the
    model's parameters with the adapters counted the same way."""
    from .model import trainable_parameter_count  # model.py attaches this function

    trainable = trainable_parameter_count(model)
    plain = [p for p in model.parameters() if not is_factor(p)]
    adapters = trainable - sum(p.numel() for p in plain if p.requires_grad)
    total = sum(p.numel() for p in plain) + adapters
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )


def _save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *args: Any,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """``save_pretrained`` of a GeoLoRA model: the adapter files into ``save_directory``
    (``state_dict``, ``safe_serialization`` and similar arguments do not apply and are ignored)."""
    from .io import save_adapter_into  # io imports model, which imports this module

    if push_to_hub:
        raise ValueError(
            "save_pretrained(push_to_hub=True) is not supported for GeoLoRA models: save "
            "locally and upload the directory, or export_peft_lora(model, path) first."
        )
    if is_main_process:
        save_adapter_into(model, Path(save_directory))


def attach_model_methods(model: nn.Module) -> None:
    """Give ``model`` the methods listed in the module docstring."""
    vars(model)["print_trainable_parameters"] = functools.partial(print_trainable_parameters, model)
    if callable(getattr(model, "save_pretrained", None)):
        vars(model)["save_pretrained"] = functools.partial(_save_pretrained, model)


def detach_model_methods(model: nn.Module) -> None:
    """Remove what :func:`attach_model_methods` added."""
    for name in _METHODS:
        vars(model).pop(name, None)
