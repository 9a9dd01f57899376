"""What ``geolora finetune`` trains, per task: the model with its adapters, the encoded training
data and the held-out evaluation.

Both tasks load the model (optionally quantizing its frozen linear layers to 4-bit NF4,
:mod:`geolora.quantized`), put GeoLoRA adapters on the targets (the architecture's defaults from
:func:`geolora.app.models.default_targets` unless ``--target-modules`` is given), and keep the
task's metadata in the adapter so that ``geolora export`` and ``geolora generate`` can rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model import find_target_names, get_geolora_model
from .causal_lm import EncodedChats, encode_chats, load_chat_task
from .classification import EncodedTexts, encode, load_task
from .evaluation import (
    answer_labels,
    evaluate_classifier,
    evaluate_lm_loss,
    generate_answers,
    score_answers,
)
from .models import default_targets, head_modules, load_causal_lm, load_classifier
from .options import FinetuneOptions

__all__ = ["DEMO_LIMIT", "DEMO_LIMITS", "Job", "adaptable_names", "build_job", "inject_adapters"]

# Embedded Rotten Tomatoes examples used when --limit is not given (of 12,808): see docs/cli.md
# (classification, minutes on a CPU) and docs/llm.md (causal-lm: a 135M LM is ~10x the work).
DEMO_LIMITS = {"classification": 6000, "causal-lm": 1000}
DEMO_LIMIT = DEMO_LIMITS["classification"]


@dataclass
class Job:
    """A model with adapters, its tokenizer, training data and evaluation."""

    model: nn.Module
    tokenizer: Any
    train: EncodedTexts | EncodedChats
    evaluate: Callable[[nn.Module], dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def adaptable_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of the model's linear layers (what targets can name)."""
    linear = (nn.Linear, nn.Conv2d)
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name and (isinstance(module, linear) or type(module).__name__ == "Conv1D")
        }
    )


def inject_adapters(model: nn.Module, options: FinetuneOptions, **extra: Any) -> nn.Module:
    """Quantize (``load_in_4bit``) and put the run's GeoLoRA adapters on ``model``; targets that
    match nothing raise a ValueError listing the model's linear layer names."""
    config = options.adapter_config(default_targets(model), **extra)
    try:
        find_target_names(model, config)
    except ValueError as err:
        raise ValueError(
            f"{err} This model's linear layers are named {adaptable_names(model)}: pass "
            "--target-modules with some of them, or all-linear."
        ) from err
    if options.load_in_4bit:
        from ..quantized import quantize_linear_layers

        dtype = getattr(torch, options.compute_dtype)
        quantize_linear_layers(model, skip=config.modules_to_save, compute_dtype=dtype)
    get_geolora_model(model, config)
    if options.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _limit(options: FinetuneOptions) -> int | None:
    if options.limit is None and options.dataset is None:
        return DEMO_LIMITS[options.task]
    return options.limit


def _classification(options: FinetuneOptions) -> Job:
    limit = _limit(options)
    task = load_task(
        options.dataset,
        options.text_column,
        options.label_column,
        options.text_pair_column,
        options.eval_fraction,
        options.seed,
        limit,
    )
    labels = task.label_names
    model, tokenizer = load_classifier(options.model_name, len(labels), labels)
    train, held_out = (encode(tokenizer, s, options.token_limit) for s in (task.train, task.eval))
    modules_to_save = head_modules(model, options.adapter.get("modules_to_save"))
    metadata = {"task": "sequence-classification", "num_labels": len(labels), "label_names": labels}
    inject_adapters(model, options, modules_to_save=modules_to_save, metadata=metadata)
    batch = max(64, 2 * options.batch_size)
    info = {"dataset": task.source, "label_names": labels, "limit": limit}
    info.update(train_examples=len(train), eval_examples=len(held_out))
    return Job(model, tokenizer, train, lambda m: evaluate_classifier(m, held_out, batch), info)


def _causal_lm(options: FinetuneOptions) -> Job:
    limit = _limit(options)
    task = load_chat_task(
        options.dataset,
        options.prompt_column,
        options.response_column,
        options.messages_column,
        options.eval_fraction,
        options.seed,
        limit,
    )
    model, tokenizer = load_causal_lm(options.model_name)
    template = options.chat_template
    train = encode_chats(tokenizer, task.train, options.token_limit, template)
    held_out = encode_chats(tokenizer, task.eval, options.token_limit, template)
    labels = answer_labels(task.train, task.eval)
    longest = max(len(tokenizer(c[-1]["content"])["input_ids"]) for c in task.eval)
    new_tokens = options.max_new_tokens or longest + 8
    metadata = {"task": "causal-lm", "chat_template": template}
    inject_adapters(model, options, metadata=metadata)

    def evaluate(model: nn.Module) -> dict[str, Any]:
        scores = evaluate_lm_loss(model, held_out, batch_size=options.batch_size)
        prompts = [chat[:-1] for chat in task.eval]
        answers = generate_answers(model, tokenizer, prompts, new_tokens, template)
        return {**scores, **score_answers(answers, task.eval, labels), "samples": answers[:5]}

    info = {"dataset": task.source, "label_names": labels, "limit": limit}
    info.update(train_examples=len(train), eval_examples=len(task.eval))
    info.update(examples_dropped=train.dropped + held_out.dropped, max_new_tokens=new_tokens)
    return Job(model, tokenizer, train, evaluate, info)


def build_job(options: FinetuneOptions) -> Job:
    """The :class:`Job` of ``options.task``."""
    return _causal_lm(options) if options.task == "causal-lm" else _classification(options)
