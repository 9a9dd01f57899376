"""Planted ranks on a real model: a teacher all-MiniLM-L6-v2 whose adapted linear maps carry known
low-rank changes, and a student (the pretrained model with adapters) fitted to its outputs.

Teacher: for each of the 36 adapted maps (query, key, value, attention output and both FFN maps
of the six encoder layers) a planted rank ``k`` from :data:`PLANTED_RANKS`, assigned by a seeded
shuffle (each rank on the same number of maps), and

    W_teacher = W + ΔW,    ΔW = ρ ‖W‖_F · Σ_{i<k} u_i v_iᵀ / √k,

with ``u_i``, ``v_i`` orthonormal (QR of a seeded Gaussian), so ``‖ΔW‖_F = ρ ‖W‖_F`` and all
``k`` singular values of ``ΔW`` are equal (``ρ ‖W‖_F / √k``): no truncation tolerance below
``1/√k`` can call the planted rank anything but ``k``.

Student: the pretrained model with adapters on the same 36 maps, trained (eval mode: no
dropout) to minimise the masked mean squared error between its last hidden states and the
teacher's,

    L = Σ_tokens ‖h_student − h_teacher‖² / (n_tokens · d),

on the embedded Rotten Tomatoes sentences. The embeddings are not adapted, so their outputs are
computed once and both models run the encoder only. The reported loss is relative:
``L(student) / L(pretrained model)`` on held-out sentences (1 = nothing learned, 0 = exact).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import minilm
import torch
from methods import TARGETS
from torch import Tensor, nn
from transformers.utils import ModelOutput

PLANTED_RANKS = (0, 2, 8, 24)


@dataclass(frozen=True)
class PlantedSetup:
    """Teacher, data and run size (part of every cache key)."""

    n_train: int = 1024
    n_eval: int = 256
    max_length: int = 24
    batch_size: int = 16
    steps: int = 300
    relative_norm: float = 0.1
    plant_seed: int = 0


SMOKE = PlantedSetup(n_train=32, n_eval=16, max_length=12, batch_size=8, steps=3)


@dataclass
class RegressionOutput(ModelOutput):
    """Output of :class:`Encoder`: the masked MSE (if targets were given) and the hidden states."""

    loss: Tensor | None = None
    mse: Tensor | None = None
    last_hidden_state: Tensor | None = None


def masked_mse(hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``Σ_{unmasked tokens} ‖hidden − target‖² / (n_tokens · d)``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden - target) ** 2 * weights).sum() / (weights.sum() * hidden.shape[-1])


class Encoder(nn.Module):
    """MiniLM's six encoder layers on cached embedding outputs (``bert.encoder.layer.i…``)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.bert.embeddings = minilm.PassThrough()
        self.bert.pooler = None

    def forward(
        self, inputs_embeds: Tensor, attention_mask: Tensor, labels: Tensor | None = None
    ) -> RegressionOutput:
        hidden = self.bert(inputs_embeds=inputs_embeds, attention_mask=attention_mask)[0]
        if labels is None:
            return RegressionOutput(last_hidden_state=hidden)
        loss = masked_mse(hidden, labels, attention_mask)
        return RegressionOutput(loss=loss, mse=loss.detach().clone(), last_hidden_state=hidden)


def regression_loss(out: RegressionOutput, labels: Tensor) -> Tensor:
    """The loss a run reports: the masked MSE, without the orthogonality penalty that peft's
    AdaLoRA adds to ``out.loss`` in place."""
    return out.mse


def pretrained_bert() -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModel.from_pretrained(minilm.model_path()).eval()


def adapted_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear maps :data:`methods.TARGETS` adapts, by name."""
    return {n: m for n, m in model.named_modules() if re.fullmatch(TARGETS, n)}


def plant(student: Encoder, setup: PlantedSetup) -> tuple[Encoder, dict[str, int]]:
    """The teacher (a copy of ``student`` with the planted changes) and the planted ranks."""
    teacher = copy.deepcopy(student)
    modules = adapted_modules(teacher)
    names = sorted(modules)
    if len(names) % len(PLANTED_RANKS):
        raise ValueError(f"{len(names)} adapted maps do not split evenly over {PLANTED_RANKS}.")
    gen = torch.Generator().manual_seed(setup.plant_seed)
    ranks = list(PLANTED_RANKS) * (len(names) // len(PLANTED_RANKS))
    ranks = [ranks[i] for i in torch.randperm(len(ranks), generator=gen)]
    with torch.no_grad():
        for name, k in zip(names, ranks):
            weight = modules[name].weight
            if k == 0:
                continue
            u = torch.linalg.qr(torch.randn(weight.shape[0], k, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(weight.shape[1], k, generator=gen))[0]
            weight += setup.relative_norm * weight.norm() / k**0.5 * (u @ v.T)
    return teacher, dict(zip(names, ranks))


@torch.no_grad()
def hidden_states(model: nn.Module, split: dict[str, Tensor]) -> Tensor:
    """``model``'s last hidden states on ``split`` (``hidden``, ``mask``), in chunks of 128."""
    out = []
    for i in range(0, len(split["hidden"]), 128):
        batch = {k: split[k][i : i + 128] for k in ("hidden", "mask")}
        out.append(
            model(inputs_embeds=batch["hidden"], attention_mask=batch["mask"]).last_hidden_state
        )
    return torch.cat(out)


_DATA: dict[PlantedSetup, dict[str, Any]] = {}


def planted_params(plan: dict[str, int]) -> int:
    """The planted changes' parameters as LoRA factors, ``Σ rank·(n + m)`` over the maps of
    ``plan`` (module name → planted rank): the planted budget."""
    shapes = {n: m.weight.shape for n, m in adapted_modules(student()).items()}
    return sum(k * sum(shapes[n]) for n, k in plan.items())


def data(setup: PlantedSetup) -> dict[str, Any]:
    """Cached embedding outputs, teacher targets and the planted ranks (once per process):
    ``{"train": split, "eval": split, "planted": {module: rank}, "teacher": stats}``; a split has
    ``hidden`` (embedding outputs), ``mask`` and ``labels`` (the teacher's last hidden states)."""
    if setup in _DATA:
        return _DATA[setup]
    from geolora.data import load_rotten_tomatoes

    torch.set_num_threads(minilm.THREADS)
    train, test = load_rotten_tomatoes(test_fraction=0.2, seed=0)
    bert = pretrained_bert()
    splits = {}
    for split, texts in (
        ("train", train.texts[: setup.n_train]),
        ("eval", test.texts[: setup.n_eval]),
    ):
        enc = minilm.tokenize(texts, setup.max_length)
        with torch.no_grad():
            hidden = bert.embeddings(input_ids=enc["input_ids"])
        splits[split] = {"hidden": hidden, "mask": enc["attention_mask"]}
    student = Encoder(bert)
    teacher, planted = plant(student, setup)
    for split in splits.values():
        split["labels"] = hidden_states(teacher, split)
    ev = splits["eval"]
    base = hidden_states(student, ev)
    weights = ev["mask"].unsqueeze(-1).float()
    pooled = [(h * weights).sum(1) / weights.sum(1) for h in (base, ev["labels"])]
    stats = {
        "base_mse": float(masked_mse(base, ev["labels"], ev["mask"])),
        "relative_output_change": float(
            ((base - ev["labels"]) * weights).norm() / (ev["labels"] * weights).norm()
        ),
        "pooled_cosine": float(torch.cosine_similarity(*pooled).mean()),
    }
    _DATA[setup] = {"planted": planted, "teacher": stats, **splits}
    return _DATA[setup]


def student() -> Encoder:
    """A fresh copy of the pretrained encoder (the student before adapters)."""
    return Encoder(pretrained_bert())


@torch.no_grad()
def relative_loss(model: nn.Module, setup: PlantedSetup) -> float:
    """Held-out ``L(model) / L(pretrained)``."""
    d = data(setup)
    ev = d["eval"]
    return (
        float(masked_mse(hidden_states(model, ev), ev["labels"], ev["mask"]))
        / d["teacher"]["base_mse"]
    )


def numerical_rank(delta: Tensor, tau: float) -> int:
    """Smallest ``k`` whose dropped singular values have joint norm ``≤ τ ‖σ‖`` (GeoLoRA's
    truncation rule, applied to a dense ΔW); 0 for ΔW = 0."""
    sigma = torch.linalg.svdvals(delta.double())
    total = float(sigma.norm())
    if total == 0.0:
        return 0
    tail = sigma.flip(0).square().cumsum(0).sqrt().flip(0)  # tail[k] = ‖σ_k..‖
    return int((tail > tau * total).sum())


def recovered(found: int, planted: int) -> bool:
    """Within ±20 % of the planted rank, or ±1 for planted ranks ≤ 5."""
    if planted <= 5:
        return abs(found - planted) <= 1
    return abs(found - planted) <= 0.2 * planted
