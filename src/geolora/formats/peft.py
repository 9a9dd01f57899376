"""peft LoRA export: a GeoLoRA layer at rank ``r`` is exactly a LoRA layer of rank ``r``,

    ΔW = s · U S Vᵀ = B A,    B = s · U S  (n × r),    A = Vᵀ  (r × m),

with each kind's tensor names and shapes (:meth:`GeoLoRALayer.peft_tensors`: kernels for
convolutions, ``lora_embedding_A/B`` for embeddings). The directory is written without peft.

Two layouts:

* training (default): every module at its own rank, ``rank_pattern`` and ``alpha_pattern`` equal
  to each module's rank, so peft's scale ``lora_alpha / r`` is 1 for every module;
* serving (``for_serving=True``): one rank ``R`` = the largest for every module (``A`` and ``B``
  zero-padded, which adds zero to ``ΔW``), ``lora_alpha = r = R``, no patterns, so every consumer
  applies the scale 1 to ``B A``:

  - peft: ``lora_alpha / r`` per module (``peft/tuners/lora/layer.py``, ``update_layer``);
  - vLLM: one ``lora_alpha / r`` from the config, no patterns (``vllm/lora/peft_helper.py``,
    ``PEFTHelper.__post_init__``: ``vllm_lora_scaling_factor``);
  - TGI: one ``lora_alpha / r`` folded into ``B``, ``A`` and ``B`` stacked over the layers of one
    type, so every layer needs the same rank
    (``server/text_generation_server/adapters/lora.py``, ``LoraWeights.prepare_weights``);
  - llama.cpp: ``convert_lora_to_gguf.py`` keeps only the global ``lora_alpha``; the runtime uses
    ``alpha / rank`` with the rank read from ``B``'s shape (``src/llama-adapter.h``,
    ``llama_adapter_lora_weight::get_scale``).

``task_type`` comes from ``GeoLoRAConfig.task_type`` or, if unset, from the model's class name
(``…ForSequenceClassification`` → ``SEQ_CLS``, ``…ForCausalLM`` / ``…LMHeadModel`` →
``CAUSAL_LM``, …), so that ``AutoPeftModelFor<Task>.from_pretrained`` loads the directory; without
a task, ``auto_mapping`` names the model class for ``AutoPeftModel``. A sequence-classification
head must be in ``modules_to_save`` to be exported (peft restores it from the file); its size
comes from the base model's config, so pass ``num_labels=`` to ``from_pretrained`` when the base
model was saved with another label count.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import GeoLoRAConfig
from ..layers import GeoLoRAConv1D, GeoLoRALayer
from ..model import geolora_layers
from ._files import CONFIG_NAME, WEIGHTS_NAME, write_adapter_dir

__all__ = ["PEFT_PREFIX", "export_peft_lora", "lora_tensors"]

PEFT_PREFIX = "base_model.model."
_TASK_BY_CLASS_SUFFIX = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
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


def lora_tensors(
    layers: dict[str, GeoLoRALayer], prefix: str, rank: int | None = None
) -> dict[str, Tensor]:
    """peft-named ``A`` / ``B`` tensors of every layer (``B = s U S``, ``A = Vᵀ``), each at its
    own rank or, with ``rank``, zero-padded to ``rank``."""
    tensors = {}
    for name, layer in layers.items():
        layer.check_peft_exportable(name)
        u, s, v = (t.detach() for t in layer.active_factors())
        a, b = v.t(), layer.scale * (u @ s)
        if rank is not None:
            a = F.pad(a, (0, 0, 0, rank - a.shape[0]))
            b = F.pad(b, (0, rank - b.shape[1]))
        a, b = layer.peft_tensors(a, b)
        name_a, name_b = layer.peft_names
        tensors[f"{prefix}{name}.{name_a}"] = a
        tensors[f"{prefix}{name}.{name_b}"] = b
    return tensors


def task_type_of(model: nn.Module, config: GeoLoRAConfig) -> str | None:
    """peft's ``task_type`` for ``model``: the config's, else one read off the class name."""
    if config.task_type is not None:
        return config.task_type
    name = type(model).__name__
    return next((task for suffix, task in _TASK_BY_CLASS_SUFFIX if name.endswith(suffix)), None)


def export_peft_lora(
    model: nn.Module,
    path: str | Path,
    base_model_name: str | None = None,
    for_serving: bool = False,
) -> Path:
    """Write the GeoLoRA adapters of ``model`` as a plain peft LoRA adapter directory (atomically,
    like :func:`geolora.save_adapter`); returns ``path``.

    ``base_model_name`` becomes ``base_model_name_or_path`` (default:
    ``model.config._name_or_path`` when set). Load with ``peft.PeftModel.from_pretrained`` or
    ``AutoPeftModelFor<Task>.from_pretrained(path)``. ``for_serving=True`` writes one rank for all
    modules with the scale folded into ``B`` (module docstring), for vLLM, TGI and llama.cpp.
    """
    from ..io import geolora_root, model_name_or_path, saved_module_names

    root, config = geolora_root(model)
    layers = geolora_layers(root)
    ranks = {name: layer.current_rank for name, layer in layers.items()}
    top = max(ranks.values())
    tensors = lora_tensors(layers, PEFT_PREFIX, rank=top if for_serving else None)
    saved = saved_module_names(root, config)
    for name in saved:
        for key, value in root.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach()
    tensors = {k: t.cpu().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    # peft takes the first pattern key that matches a name's tail: longest keys first.
    pattern = dict(sorted(ranks.items(), key=lambda item: (-len(item[0]), item[0])))
    task_type = task_type_of(root, config)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name or model_name_or_path(root),
        "r": top,
        "lora_alpha": top,
        "target_modules": exact_targets(root, list(layers)),
        "rank_pattern": {} if for_serving else pattern,
        "alpha_pattern": {} if for_serving else pattern,
        "lora_dropout": config.lora_dropout,
        "fan_in_fan_out": all(isinstance(layer, GeoLoRAConv1D) for layer in layers.values()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if task_type is None:
        cls = type(root)
        peft_config["auto_mapping"] = {
            "base_model_class": cls.__name__,
            "parent_library": cls.__module__,
        }
    files = {
        WEIGHTS_NAME: save_safetensors(tensors, metadata={"format": "pt"}),
        CONFIG_NAME: json.dumps(peft_config, indent=2).encode(),
    }
    return write_adapter_dir(Path(path), files)
