"""Base update rules for the factors (spec §4) and the transport of their state to a new basis.

The integrator needs, per adapter, update directions ``D_K``, ``D_L``, ``D_S`` for
``K = U S`` (n × r), ``L = V Sᵀ`` (m × r) and ``S`` (r × r), given their gradients ``G_*``.
One small class per rule, registered in :data:`BASE_RULES`:

* ``riemannian_adam_features`` (the default): first moments ``M ← β₁M + (1−β₁)G`` for the three
  blocks, one second moment per ambient feature for the rows of ``G_K`` (an output feature) and of
  ``G_L`` (an input feature), ``q_i ← β₂q_i + (1−β₂)·‖G[i, :]‖² / r₀``, and one scalar per adapter
  ``q ← β₂q + (1−β₂)·‖G‖² / ((n + m + r) r₀)`` for the core, with the fixed reference rank
  ``r₀ =`` :data:`REFERENCE_RANK`. Row ``i`` of ``D_K`` and ``D_L`` is ``M̂_i / (sqrt(q̂_i) + ε)``,
  the core's ``M̂_S / (sqrt(q̂) + ε)``. Every ambient feature's step is of order λ, as in Adam on
  LoRA's ``A`` and ``B`` (peft LoRA with one second moment per feature fits the planted teacher as
  well as with AdamW's per coordinate), while the core, where the gradient concentrates once the
  bases hold its leading directions, keeps a step above λ per entry (capping it, as
  ``riemannian_adam_rows`` does, slows the fit). A row's squared norm over the columns is its norm
  in the span, so the moments do not depend on the bases' coordinates: rank decisions are
  rotation-invariant and the state transports exactly. The divisor is a fixed ``r₀``, not the
  active rank: with a mean over the ``r`` active columns, columns that carry little gradient (a
  layer's margin triplets, new directions) lower the mean and enlarge every row's step, so a
  layer's step grew like ``sqrt(r / r_eff)`` with its rank (docs/algorithm.md §8).
* ``riemannian_adam``: the same first moments and one scalar per adapter
  ``q ← β₂q + (1−β₂)·mean(G∘G)`` over all of ``G_K, G_L, G_S`` (the squared norm of the tangent
  vector per entry), ``D = M̂ / (sqrt(q / (1−β₂ᵗ)) + ε)``. This is Adam on the product
  manifold of each adapter as in Bécigneul & Ganea (ICLR 2019, "Riemannian adaptive optimization
  methods"): the direction is the momentum-averaged tangent gradient times one number. Its rank
  decisions are those of the gradient itself, the step of each entry is of order λ whatever the
  gradient's scale, and every piece of state transports exactly. It was the default until
  2026-12-07; it fits the planted teacher and the vision transfer worse (docs/algorithm.md §8).
* ``riemannian_adam_rows``: ``riemannian_adam`` whose step is also capped block by block. Besides
  the scalar ``q`` it keeps ``q_i ← β₂q_i + (1−β₂)·mean_j G[i, j]²`` for every row of ``G_K`` and
  of ``G_L`` (a mean over the ``r`` active columns), and one ``q_S`` of ``mean(G_S∘G_S)`` for the
  core block, and divides each row of the direction by ``sqrt(max(q̂_i, q̂)) + ε`` (the core by
  ``sqrt(max(q̂_S, q̂)) + ε``): no row and not the core moves by more than order λ per entry, and
  none is amplified beyond ``riemannian_adam``'s step. Where a few features carry most of the
  gradient (the outlier activations of causal LMs) the scalar lets those entries take steps far
  above λ; this rule keeps them at λ, as per-coordinate Adam in LoRA's factors does. It is the
  default of ``geolora finetune --task causal-lm`` (docs/llm.md).
* ``adam``: per-coordinate Adam, ``Q ← β₂Q + (1−β₂)G∘G``, ``D = M̂ / (sqrt(Q̂) + ε)``. Its
  per-coordinate normalisation gives every coordinate of ``D_K``, ``D_L`` a step of order λ,
  including directions with no gradient behind them, which inflates ranks (docs/algorithm.md §8).
* ``sgd``: ``D = G``, or with momentum ``μ``: ``B ← μ B + G``, ``D = B`` (the paper's form).

``t`` is the adapter's own step count. The Adam-type rules divide the second moment by
``1 − β₂ᵗ`` (``q̂``, ``Q̂``); ``M̂`` is, with Adam's correction (the optimizer's default
``first_moment_correction=True``), ``M / (1 − β₁ᵗ)``, or the first moment as it is. Uncorrected,
a constant gradient moves an adapter by ``(1 − β₁ᵗ) λ``: 0.1 λ at its first step, 0.65 λ at the
tenth. At ``S = 0`` the first steps alone make the singular values, and with the correction the
first one, a single noisy gradient, set every direction of the doubled basis at full size, which
later steps must outgrow before τ can drop them (docs/algorithm.md §8).

Block state lives in fixed-size tensors (rank ``r_max``) of which the leading ``r`` columns are
active. The rules are elementwise on *blocks*: the ``K``-, ``L``- and ``S``-parts of an adapter
stacked along rows, (n + m + r) × r, and a batch of adapters stacked along dim 0
(:func:`split_block` takes them apart); scalar state is stacked as (B, 1, 1). After the step
moves the basis, each block state is rewritten in the new coordinates with the maps ``C_u``,
``C_v`` (r₁ × r, from :func:`geolora.optim.integrator.coordinate_change`). Columns of K are
indexed by the V-side basis and columns of L by the U-side basis, so

    M_K ← M_K C_vᵀ,   M_L ← M_L C_uᵀ,   M_S ← C_u M_S C_vᵀ          (first moments: exact)

Scalar second moments are invariant, and so are row second moments (indexed by ambient features,
not by basis directions) and the core's mean; they are stored as one-column blocks (kind
``row_second``: one value per row of ``K`` and ``L``, the core's value in each of the ``S`` rows
below the rank), which the transport keeps as they are. Per-coordinate second
moments are not rotation-invariant: ``adam`` transports them as variances of independent
coordinates, ``Q_K ← Q_K (C_v∘C_v)ᵀ`` (and alike), which stays non-negative and never cancels to
zero; a brand-new direction (a row of ``C`` with squared norm ``w < 1``) has no history, and the
missing share ``1 − w`` is filled with the mean second moment of the same row of the old state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BASE_RULES",
    "DEFAULT_BASE_RULE",
    "MOMENT_KEYS",
    "SCALAR_KEYS",
    "BaseRule",
    "get_base_rule",
    "split_block",
]

MOMENT_KEYS = {
    "first": ("K", "L", "S"),
    "second": ("K_sq", "L_sq", "S_sq"),
    "row_second": ("K_rsq", "L_rsq", "S_rsq"),
}
"""State keys of each kind of block moment, in block order; the first letter gives the rows:
``K`` n, ``L`` m, ``S`` r_max; the columns are r_max, or 1 for the kinds in
:data:`ONE_COLUMN_KINDS`."""
ONE_COLUMN_KINDS = ("row_second",)
"""Kinds that hold one value per row (a row's second moment does not depend on the column): one
column of storage, read and transported as a (…, rows, 1) block."""
SCALAR_KEYS = {"scalar_second": "sq"}
"""State key of each kind of per-adapter scalar moment (a 0-d tensor)."""
REFERENCE_RANK = 8
"""``r₀``: what ``riemannian_adam_features`` divides a row's squared gradient norm by (LoRA's usual
rank, so that at rank 8 every feature's step is Adam's λ per entry)."""


@dataclass(frozen=True)
class Hyper:
    """The constants a rule may use."""

    momentum: float
    betas: tuple[float, float]
    eps: float
    first_moment_correction: bool


def split_block(block: Tensor, n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``K``- (…, n, r), ``L``- (…, m, r) and ``S``-parts (…, r, r) of a block (…, ≥ n+m+r, r);
    rows beyond ``n + m + r`` are ignored."""
    r = block.shape[-1]
    return block[..., :n, :], block[..., n : n + m, :], block[..., n + m : n + m + r, :]


def _bias_corrections(steps: Tensor, hyper: Hyper, like: Tensor) -> tuple[Tensor, Tensor]:
    """Adam's ``c₁ = 1 − β₁ᵗ`` and ``c₂ = 1 − β₂ᵗ`` per adapter, (B, 1, 1); ``c₁ = 1`` without
    the first moment's correction (``M`` itself then ramps each adapter's step up: a gradient
    that stays the same moves by ``(1 − β₁ᵗ) λ``, see docs/algorithm.md §8)."""
    t = steps.to(torch.float64).view(-1, 1, 1)
    c1, c2 = ((1 - b**t).to(like, non_blocking=True) for b in hyper.betas)
    return (c1 if hyper.first_moment_correction else torch.ones_like(c1)), c2


def _rotate_first(first: Tensor, n: int, m: int, c_u: Tensor, c_v: Tensor) -> dict:
    k, l, s = split_block(first, n, m)
    c_ut, c_vt = c_u.transpose(-1, -2), c_v.transpose(-1, -2)
    return {"K": k @ c_vt, "L": l @ c_ut, "S": c_u @ s @ c_vt}


class BaseRule:
    """A base rule: which moments it keeps, its directions and the transport of its state."""

    def kinds(self, hyper: Hyper) -> tuple[str, ...]:
        """Kinds of state kept (keys of :data:`MOMENT_KEYS` or :data:`SCALAR_KEYS`)."""
        raise NotImplementedError

    def directions(
        self, moments: dict[str, Tensor], grad: Tensor, steps: Tensor, hyper: Hyper, active: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Directions for the stacked gradient blocks ``grad`` (B, rows, r) and the stacked
        moments (``{kind: tensor}``); ``steps`` (B,) are the adapters' step counts including this
        step, ``active`` (B,) their ranks (columns beyond are zero padding, rows too in the
        ``S``-part). Returns ``(updated moments, directions)``; nothing is changed in place."""
        raise NotImplementedError

    def transport(
        self,
        moments: dict[str, Tensor],
        n: int,
        m: int,
        c_u: Tensor,
        c_v: Tensor,
        live: Tensor,
        active: Tensor,
    ) -> dict[str, Tensor]:
        """The updated moments rewritten in the new bases, ``{state key: stacked tensor}``:
        blocks (B, rows, k) for the ``k`` rows of ``c_u``, ``c_v`` (B, k, r), zero beyond each
        adapter's new rank (``live`` (B, k) is 1 below it, 0 beyond); scalars (B, 1, 1).
        ``active`` (B,) are the ranks before the step, as in :meth:`directions`."""
        out = {}
        if "first" in moments:
            out.update(_rotate_first(moments["first"], n, m, c_u, c_v))
        return out

    def init_state(self, n: int, m: int, r_max: int, hyper: Hyper, like: Tensor) -> dict:
        """Zero state for one adapter (full ``r_max`` size) and its step counter ``"step"``."""
        state: dict = {"step": torch.zeros((), dtype=torch.float32)}
        rows = {"K": n, "L": m, "S": r_max}
        for kind in self.kinds(hyper):
            if kind in SCALAR_KEYS:
                state[SCALAR_KEYS[kind]] = like.new_zeros(())
            else:
                columns = 1 if kind in ONE_COLUMN_KINDS else r_max
                for key in MOMENT_KEYS[kind]:
                    state[key] = like.new_zeros(rows[key[0]], columns)
        return state


class SGD(BaseRule):
    """``D = G`` or, with momentum ``μ``, ``B ← μB + G``, ``D = B``."""

    def kinds(self, hyper: Hyper) -> tuple[str, ...]:
        return ("first",) if hyper.momentum > 0 else ()

    def directions(self, moments, grad, steps, hyper, active):
        if hyper.momentum == 0:
            return {}, grad
        first = moments["first"] * hyper.momentum + grad
        return {"first": first}, first


class Adam(BaseRule):
    """Per-coordinate Adam directions (see the module docstring)."""

    def kinds(self, hyper: Hyper) -> tuple[str, ...]:
        return ("first", "second")

    def directions(self, moments, grad, steps, hyper, active):
        beta1, beta2 = hyper.betas
        c1, c2 = _bias_corrections(steps, hyper, grad)
        first = moments["first"].lerp(grad, 1 - beta1)
        second = torch.addcmul(moments["second"] * beta2, grad, grad, value=1 - beta2)
        d = (first / c1) / ((second / c2).sqrt() + hyper.eps)
        return {"first": first, "second": second}, d

    def transport(self, moments, n, m, c_u, c_v, live, active):
        out = super().transport(moments, n, m, c_u, c_v, live, active)
        k, l, s = split_block(moments["second"], n, m)
        cu2, cv2 = c_u.square(), c_v.square()
        w_u, w_v = cu2.sum(-1).clamp(max=1), cv2.sum(-1).clamp(max=1)
        out["K_sq"] = _fill_new(k, k @ cv2.transpose(-1, -2), live - w_v, active)
        out["L_sq"] = _fill_new(l, l @ cu2.transpose(-1, -2), live - w_u, active)
        both = live.unsqueeze(-1) * live.unsqueeze(-2)
        missing_s = (both - w_u.unsqueeze(-1) * w_v.unsqueeze(-2)).clamp(min=0)
        moved_s = cu2 @ s @ cv2.transpose(-1, -2)
        s_mean = s.sum(dim=(-2, -1), keepdim=True) / _per_adapter(active * active)
        out["S_sq"] = moved_s + s_mean * missing_s
        return out


class RiemannianAdam(BaseRule):
    """Adam with one scalar second moment per adapter (see the module docstring)."""

    def kinds(self, hyper: Hyper) -> tuple[str, ...]:
        return ("first", "scalar_second")

    def directions(self, moments, grad, steps, hyper, active):
        beta1, beta2 = hyper.betas
        c1, c2 = _bias_corrections(steps, hyper, grad)
        first = moments["first"].lerp(grad, 1 - beta1)
        rows = grad.shape[-2] - grad.shape[-1] + active  # n + m + r per adapter
        mean_sq = grad.square().sum(dim=(-2, -1), keepdim=True) / _per_adapter(rows * active)
        second = moments["scalar_second"].lerp(mean_sq, 1 - beta2)
        d = (first / c1) / ((second / c2).sqrt() + hyper.eps)
        return {"first": first, "scalar_second": second}, d

    def transport(self, moments, n, m, c_u, c_v, live, active):
        out = super().transport(moments, n, m, c_u, c_v, live, active)
        out[SCALAR_KEYS["scalar_second"]] = moments["scalar_second"]
        return out


class RiemannianAdamRows(RiemannianAdam):
    """``riemannian_adam`` with each row's and the core's step capped at order λ (see the module
    docstring)."""

    def kinds(self, hyper: Hyper) -> tuple[str, ...]:
        return ("first", "row_second", "scalar_second")

    def moments(self, moments, grad, hyper, active) -> dict[str, Tensor]:
        """The updated first moments, scalar ``q`` and row / core second moments (a one-column
        block: each row's value, the core's in each of the ``r`` core rows)."""
        beta2 = hyper.betas[1]
        first = moments["first"].lerp(grad, 1 - hyper.betas[0])
        r = grad.shape[-1]
        rows = grad.shape[-2] - r + active  # n + m + r per adapter
        columns = self.moment_columns(active)
        square = grad.square()
        mean_sq = square.sum(dim=(-2, -1), keepdim=True) / _per_adapter(rows * columns)
        scalar = moments["scalar_second"].lerp(mean_sq, 1 - beta2)
        row_sq = square[..., :-r, :].sum(-1, keepdim=True) / _per_adapter(columns)
        core_sq = square[..., -r:, :].sum(dim=(-2, -1), keepdim=True) / _per_adapter(active**2)
        fresh = torch.cat([row_sq, core_sq.expand(-1, r, 1)], dim=-2)
        second = moments["row_second"].lerp(fresh, 1 - beta2)
        return {"first": first, "row_second": second, "scalar_second": scalar}

    def moment_columns(self, active: Tensor) -> Tensor:
        """What a row's squared norm is divided by to give its second moment (and the block's
        to give the scalar ``q``, with the row count): the adapters' active ranks, a mean."""
        return active

    def denominator(self, second: Tensor, scalar: Tensor, r: int) -> Tensor:
        """What each row of the direction is divided by (before the bias correction):
        ``max(q_row, q)`` for the rows of ``K`` and ``L``, ``max(q_S, q)`` for the core."""
        return torch.maximum(second, scalar)

    def directions(self, moments, grad, steps, hyper, active):
        c1, c2 = _bias_corrections(steps, hyper, grad)
        new = self.moments(moments, grad, hyper, active)
        q = self.denominator(new["row_second"], new["scalar_second"], grad.shape[-1])
        return new, (new["first"] / c1) / ((q / c2).sqrt() + hyper.eps)

    def transport(self, moments, n, m, c_u, c_v, live, active):
        out = super().transport(moments, n, m, c_u, c_v, live, active)
        rows = moments["row_second"]
        out["K_rsq"], out["L_rsq"] = rows[..., :n, :], rows[..., n : n + m, :]
        out["S_rsq"] = rows[..., n + m : n + m + 1, :] * live.unsqueeze(-1)
        return out


class RiemannianAdamFeatures(RiemannianAdamRows):
    """One second moment per ambient feature for the rows of ``K`` and ``L``, the adapter's
    scalar for the core, both over the fixed reference rank (see the module docstring)."""

    def moment_columns(self, active: Tensor) -> Tensor:
        """:data:`REFERENCE_RANK` for every adapter, whatever its active rank."""
        return torch.full_like(active, REFERENCE_RANK)

    def denominator(self, second: Tensor, scalar: Tensor, r: int) -> Tensor:
        """``q_row`` for the rows of ``K`` and ``L`` (no floor), ``q`` for the core."""
        return torch.cat([second[..., :-r, :], scalar.expand(-1, r, 1)], dim=-2)


def _per_adapter(counts: Tensor) -> Tensor:
    """Integer counts (B,) as a (B, 1, 1) divisor."""
    return counts.view(-1, 1, 1)


def _fill_new(old_sq: Tensor, moved: Tensor, missing: Tensor, active: Tensor) -> Tensor:
    """``moved`` plus the row means of ``old_sq`` (B, a, r) over each adapter's ``active``
    columns times the missing share (B, k) of each new column."""
    row_means = old_sq.sum(dim=-1, keepdim=True) / _per_adapter(active)
    return moved + row_means * missing.unsqueeze(-2)


BASE_RULES: dict[str, BaseRule] = {
    "riemannian_adam_features": RiemannianAdamFeatures(),
    "riemannian_adam": RiemannianAdam(),
    "riemannian_adam_rows": RiemannianAdamRows(),
    "adam": Adam(),
    "sgd": SGD(),
}
"""The registered rules by name; the first is the default."""
DEFAULT_BASE_RULE = next(iter(BASE_RULES))


def get_base_rule(name: str) -> BaseRule:
    """The rule registered as ``name``, or a ValueError listing the known ones."""
    if name not in BASE_RULES:
        raise ValueError(f"base_rule must be one of {tuple(BASE_RULES)}, got {name!r}.")
    return BASE_RULES[name]
