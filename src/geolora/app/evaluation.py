"""Held-out evaluation for ``geolora finetune``.

* classification: accuracy and mean cross-entropy.
* causal LM: the mean cross-entropy per answer token ``L = −(1/N) Σ log p(yₜ | y<ₜ)`` over the
  ``N`` trained tokens, its perplexity ``exp(L)``, and greedy generation from every held-out
  prompt: ``exact_match`` is the share of answers equal to the reference (white space at the ends
  ignored). When the answers are labels (at most :data:`MAX_LABELS` distinct training answers and
  every held-out answer among them), ``accuracy`` is the share whose generated text names the
  right label first (whole words, any case).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batches import pad_rows
from .causal_lm import IGNORE, EncodedChats, Message, prompt_ids
from .classification import EncodedTexts

__all__ = [
    "MAX_LABELS",
    "answer_labels",
    "evaluate_classifier",
    "evaluate_lm_loss",
    "first_label",
    "generate_answers",
]

MAX_LABELS = 20


def _by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class _EvalMode:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, data: EncodedTexts, batch_size: int = 128
) -> dict[str, float]:
    """Accuracy and mean cross-entropy on ``data`` (batched by length, in eval mode)."""
    correct, loss_sum = 0, 0.0
    with _EvalMode(model):
        for indices in _by_length(data.lengths(), batch_size):
            batch = data.batch(indices)
            out = model(**batch)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            loss_sum += float(out.loss) * len(indices)
    return {"accuracy": correct / len(data), "eval_loss": loss_sum / len(data)}


@torch.no_grad()
def evaluate_lm_loss(
    model: nn.Module, data: EncodedChats, batch_size: int = 16
) -> dict[str, float]:
    """Mean cross-entropy per answer token and its perplexity (module docstring)."""
    loss_sum, tokens = 0.0, 0
    with _EvalMode(model):
        for indices in _by_length(data.lengths(), batch_size):
            batch = data.batch(indices)
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            loss_sum += float(
                F.cross_entropy(
                    logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="sum"
                )
            )
            tokens += int((target != IGNORE).sum())
    loss = loss_sum / max(1, tokens)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    chats: list[list[Message]],
    max_new_tokens: int,
    chat_template: bool = True,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers after every conversation in ``chats`` (each one ending before the answer),
    decoded without special tokens and stripped."""
    prompts = [prompt_ids(tokenizer, chat, chat_template) for chat in chats]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers: list[str] = [""] * len(chats)
    with _EvalMode(model):
        for indices in _by_length([len(p) for p in prompts], batch_size):
            rows = [prompts[i] for i in indices]
            ids = pad_rows(rows, pad, left=True)
            mask = pad_rows([[1] * len(row) for row in rows], 0, left=True)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            for i, row in zip(indices, out[:, ids.shape[1] :]):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return answers


def answer_labels(train: list[list[Message]], held_out: list[list[Message]]) -> list[str] | None:
    """The label set if the answers are labels (module docstring), else ``None``."""
    labels = sorted({chat[-1]["content"].strip() for chat in train})
    if len(labels) > MAX_LABELS or any(c[-1]["content"].strip() not in labels for c in held_out):
        return None
    return labels


def first_label(text: str, labels: list[str]) -> str | None:
    """The label named first in ``text`` (whole words, any case), or ``None``."""
    found = [
        (match.start(), label)
        for label in labels
        if (match := re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text, re.IGNORECASE))
    ]
    return min(found)[1] if found else None


def score_answers(
    answers: list[str], chats: list[list[Message]], labels: list[str] | None
) -> dict[str, float]:
    """``exact_match`` and, with ``labels``, ``accuracy`` of generated ``answers``."""
    references = [chat[-1]["content"].strip() for chat in chats]
    scores = {"exact_match": sum(a == r for a, r in zip(answers, references)) / len(answers)}
    if labels is not None:
        hits = sum(first_label(a, labels) == r for a, r in zip(answers, references))
        scores["accuracy"] = hits / len(answers)
    return scores
