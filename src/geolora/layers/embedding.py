"""``nn.Embedding``: the weight is the table ``E`` (num_embeddings × dim), ``y = E[x]``.

The adapter modifies ``W = Eᵀ`` (n × m = dim × num_embeddings), as peft does, so that
``y = W one_hot(x)`` and the input projection is the row lookup ``down(x; V) = V[x]``
(``one_hot(x) V``). Its weight gradient scatters the output gradient back to the rows that were
looked up, ``∂/∂V <g, V[x]> = Σ_t e_{x_t} g_tᵀ`` (``index_add``); the indices get no gradient.

The ``padding_idx`` row is never adapted, as ``nn.Embedding`` never trains it: ``down`` gives 0
for padding tokens, so their output is the base row, the weight gradient ``G`` has a zero column
there (in ``G_K``, ``G_L`` and ``G_S`` alike), and ``ΔW``'s padding column is written as zero
wherever ``ΔW`` leaves the layer (merge, peft export). ``ΔW`` in the table's layout is ``ΔWᵀ``;
peft's tensors are ``lora_embedding_A = Vᵀ`` (r × num_embeddings) and ``lora_embedding_B = s U S``
(dim × r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import GeoLoRALayer

__all__ = ["EmbeddingProjection", "GeoLoRAEmbedding"]


@dataclass(frozen=True)
class EmbeddingProjection:
    """``down(x; V) = V[x]`` for integer ``x``."""

    padding_idx: int | None

    def down(self, x: Tensor, v: Tensor) -> Tensor:
        h = F.embedding(x, v)
        if self.padding_idx is None:
            return h
        return h * (x != self.padding_idx).unsqueeze(-1).to(h.dtype)

    def weight_grad(self, x: Tensor, g: Tensor, v: Tensor) -> Tensor:
        grad = v.new_zeros(v.shape).index_add_(0, x.reshape(-1), g.reshape(-1, g.shape[-1]))
        if self.padding_idx is not None:
            grad[self.padding_idx] = 0
        return grad

    def input_grad(self, x: Tensor, g: Tensor, v: Tensor) -> None:
        return None


class GeoLoRAEmbedding(GeoLoRALayer):
    """Adapter on ``nn.Embedding`` (``max_norm`` unset: it rewrites the table in the forward)."""

    peft_names = ("lora_embedding_A", "lora_embedding_B")

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @staticmethod
    def refusal(module: nn.Embedding) -> str | None:
        if module.max_norm is not None:
            return (
                f"an nn.Embedding with max_norm={module.max_norm}, which renormalises its table in "
                "the forward, so the adapter could not follow it; use max_norm=None"
            )
        return None

    @staticmethod
    def matrix_shape(module: nn.Embedding) -> tuple[int, int]:
        return module.embedding_dim, module.num_embeddings

    def __init__(self, base_layer: nn.Embedding, **kwargs) -> None:
        super().__init__(base_layer, EmbeddingProjection(base_layer.padding_idx), **kwargs)

    def prepare_input(self, x: Tensor) -> Tensor:
        """Indices go in as they are (no dropout on indices; peft drops nothing here either)."""
        return x

    def _without_padding_column(self, matrix: Tensor) -> Tensor:
        """``matrix`` (… × num_embeddings) with the ``padding_idx`` column set to zero."""
        if self.padding_idx is None:
            return matrix
        keep = torch.ones(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        keep[self.padding_idx] = 0
        return matrix * keep

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        return self._without_padding_column(delta).t()

    def peft_tensors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return self._without_padding_column(a), b
