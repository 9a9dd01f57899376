"""The geometric step of GeoLoRA as pure tensor functions (spec §2).

All functions accept leading batch dimensions (``...``), so layers that share a shape can be
stepped together. Notation for one adapter ``W = W0 + s·U S Vᵀ`` (``U``: n×r, ``V``: m×r):

* ``D_K``, ``D_L``, ``D_S``: update directions of ``K = U S``, ``L = V Sᵀ`` and ``S`` (the
  gradients for plain SGD, a preconditioned direction otherwise).
* Basis augmentation: ``[U | D_K] = Q R`` (Householder QR). Then ``U = Q₁ R₁₁`` exactly and the
  part of ``D_K`` outside span(U) is ``Q₂ R₂₂``. The augmented basis is ``Û = [Q₁ | Q₂]``: it spans
  ``[U | Ũ]`` of the paper, is orthonormal to machine precision whatever the rounding in ``U``, and
  costs nothing beyond the QR itself.
* Augmented coefficients in the bases ``(Û, V̂)``:

      Ŝ = [ R₁₁ᵘ S₁ R₁₁ᵛᵀ      −λ R₁₁ᵘ R₂₂ᴸᵀ ]      S₁ = (1 − λ·wd) S − λ D_S
          [ −λ R₂₂ᴷ R₁₁ᵛᵀ       0             ]

  which is the paper's ``[[S₁, L₁ᵀṼ], [ŨᵀK₁, 0]]`` written in the re-orthonormalised basis, so
  that ``Û Ŝ V̂ᵀ = U S₁ Vᵀ − λ (I − UUᵀ) D_K Vᵀ − λ U D_Lᵀ (I − VVᵀ)``. With SGD directions this
  is the tangent-space step ``U S Vᵀ − λ P(G)``, ``P(G) = UUᵀG + GVVᵀ − UUᵀGVVᵀ``.
* Padded adapters: an adapter of rank ``rᵢ`` stepped with wider ones (width ``r``) carries zero
  columns ``rᵢ … r − 1`` in ``U``, ``V``, ``S`` and the directions. The QR then gives arbitrary
  orthonormal columns ``q_j`` at those positions, and the part of ``D_K`` along them lands in
  rows ``rᵢ … r − 1`` of ``R₁₂`` rather than in ``R₂₂``; it lies outside span(U) all the same.
  So with ``Pᵘ`` = those rows of ``R₁₂ᵘ`` (zero elsewhere) the top-left block gains
  ``−λ Pᵘ R₁₁ᵛᵀ − λ R₁₁ᵘ Pᵛᵀ``, and ``Ŝ`` represents exactly the adapter's own step in a basis
  with ``r − rᵢ`` extra directions that carry nothing (``augment_basis(..., active=rᵢ)``).
* Shrinkage (``μ`` = ``GeoLoRAConfig.shrinkage``): ``Ŝ = P Σ Qᵀ``, then
  ``σᵢ ← max(σᵢ − μ‖ΔŜ‖₂, 0)`` where ``ΔŜ`` is ``Ŝ`` with ``S₁`` replaced by ``−λ D_S``: the
  step's own contribution. This is the proximal step of a nuclear-norm penalty whose weight is
  a fraction of the step's size, so it is free of scale (lr, gradient, base rule) and vanishes
  as the step does (an exact fit stays exact).
* Truncation: keep ``r₁`` singular triplets (chosen by :mod:`geolora.optim.rank_rules`):
  ``U ← Û P[:, :r₁]``, ``V ← V̂ Q[:, :r₁]``, ``S ← diag(σ₁..σ_{r₁})``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AugmentedBasis",
    "augment_basis",
    "augmented_coefficients",
    "coordinate_change",
    "shrink_singular_values",
]


@dataclass
class AugmentedBasis:
    """Result of :func:`augment_basis` for one side (U or V).

    ``basis = [Q₁ | Q₂]`` (…, n, r + k) orthonormal; ``r11`` (…, r, r) with ``old = Q₁ r11``;
    ``r22`` (…, k, r) with ``(I − old oldᵀ) D = Q₁ padded + Q₂ r22``, where ``padded`` (…, r, r)
    holds the rows of ``R₁₂`` at the zero columns of padded adapters (None: no padding).
    """

    basis: Tensor
    r11: Tensor
    r22: Tensor
    padded: Tensor | None = None


def augment_basis(old: Tensor, direction: Tensor, active: Tensor | None = None) -> AugmentedBasis:
    """Augment an orthonormal basis ``old`` (…, n, r) by the directions of ``direction``
    (…, n, r) that lie outside its span: ``[old | D] = Q R``, ``k = min(r, n − r)`` new columns.
    ``active`` (…,) gives the ranks of padded adapters (columns beyond them zero in ``old`` and
    ``direction``; see the module docstring).

    The augmentation is never capped at ``r_max``: a layer at ``r_max`` still sees ``r`` new
    directions, so its bases keep rotating; the truncation caps the rank afterwards (spec §2
    allows either; a cap here would freeze the bases of every layer that reaches ``r_max``).
    """
    r = old.shape[-1]
    k = min(r, old.shape[-2] - r)
    q, rr = torch.linalg.qr(torch.cat([old, direction], dim=-1), mode="reduced")
    padded = None
    if active is not None:
        beyond = torch.arange(r, device=old.device) >= active.unsqueeze(-1)
        padded = rr[..., :r, r:] * beyond.unsqueeze(-1).to(rr)
    return AugmentedBasis(q[..., :, : r + k], rr[..., :r, :r], rr[..., r : r + k, r:], padded)


def augmented_coefficients(
    s1: Tensor, u_aug: AugmentedBasis, v_aug: AugmentedBasis, lr: float | Tensor
) -> Tensor:
    """Assemble ``Ŝ`` (…, r + kᵤ, r + kᵥ) from the updated coefficients ``s1`` (…, r, r) and the
    two augmentations of ``[U | D_K]`` and ``[V | D_L]`` (see the module docstring)."""
    top_left = u_aug.r11 @ s1 @ v_aug.r11.transpose(-1, -2)
    if u_aug.padded is not None:
        top_left = top_left - lr * (u_aug.padded @ v_aug.r11.transpose(-1, -2))
    if v_aug.padded is not None:
        top_left = top_left - lr * (u_aug.r11 @ v_aug.padded.transpose(-1, -2))
    top_right = -lr * (u_aug.r11 @ v_aug.r22.transpose(-1, -2))
    bottom_left = -lr * (u_aug.r22 @ v_aug.r11.transpose(-1, -2))
    ku, kv = u_aug.r22.shape[-2], v_aug.r22.shape[-2]
    zeros = s1.new_zeros(*s1.shape[:-2], ku, kv)
    top = torch.cat([top_left, top_right], dim=-1)
    bottom = torch.cat([bottom_left, zeros], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def shrink_singular_values(sigma: Tensor, step: Tensor, shrinkage: float) -> Tensor:
    """Soft threshold ``σ ← max(σ − μ‖ΔŜ‖₂, 0)`` of the singular values ``sigma`` (…, k) of
    ``Ŝ``, with ``ΔŜ`` = ``step`` (…, a, b) the step's own part of ``Ŝ`` (``augmented_coefficients``
    of ``−λ D_S``) and ``μ`` = ``shrinkage``.

    A triplet the gradient keeps feeding gains about its share of ``‖ΔŜ‖₂`` per step and loses
    ``μ‖ΔŜ‖₂``, so it survives while its share exceeds ``μ``; one fed by noise alone random-walks
    and is pulled to zero. Since the threshold is measured in units of the step, it is invariant
    to the learning rate, the gradient's scale and the base rule, and vanishes as the step does.
    """
    theta = shrinkage * torch.linalg.matrix_norm(step, ord=2)
    return (sigma - theta.unsqueeze(-1)).clamp(min=0)


def coordinate_change(r11: Tensor, kept: Tensor) -> Tensor:
    """Map coefficients in the old basis to the new one: ``C = keptᵀ [r11; 0]`` (…, r₁, r).

    A vector ``c`` in old-basis coordinates is the ambient vector ``old c = Û [r11 c; 0]``; its
    orthogonal projection onto the new basis ``Û kept`` has coordinates ``C c``. New directions
    (rows of ``C`` with small norm) receive nothing: optimizer state starts from zero there.
    """
    r = r11.shape[-1]
    return kept[..., :r, :].transpose(-1, -2) @ r11
