"""Base update rules for the factors (spec §4) and the transport of their state to a new basis.

The integrator needs, per adapter, update directions ``D_K``, ``D_L``, ``D_S`` for
``K = U S`` (n × r), ``L = V Sᵀ`` (m × r) and ``S`` (r × r), given their gradients ``G_*``:

* ``sgd``: ``D = G``, or with momentum ``μ``: ``B ← μ B + G``, ``D = B`` (the paper's form).
* ``adam``: ``M ← β₁M + (1−β₁)G``, ``Q ← β₂Q + (1−β₂)G∘G``,
  ``D = (M / (1−β₁ᵗ)) / (sqrt(Q / (1−β₂ᵗ)) + ε)``, with ``t`` the adapter's own step count.

State lives in fixed-size tensors (rank ``r_max``) of which the leading ``r`` columns are active.
The rules are elementwise, so they run on *blocks*: the ``K``-, ``L``- and ``S``-parts of an
adapter stacked along rows, (n + m + r) × r, and a batch of adapters stacked along dim 0
(:func:`split_block` takes them apart). After the step moves the basis, each state is rewritten
in the new coordinates with the maps ``C_u``, ``C_v`` (r₁ × r, from
:func:`geolora.integrator.coordinate_change`). Columns of K are indexed by the V-side basis and
columns of L by the U-side basis, so

    M_K ← M_K C_vᵀ,   M_L ← M_L C_uᵀ,   M_S ← C_u M_S C_vᵀ          (first moments: exact)

Second moments are not rotation-invariant. We transport them as variances of independent
coordinates, ``Q_K ← Q_K (C_v∘C_v)ᵀ`` (and alike), which stays non-negative and never cancels
to zero. A brand-new direction (a row of ``C`` with squared norm ``w < 1``) has no history: the
missing share ``1 − w`` is filled with the mean second moment of the same row of the old state,
so that new directions start at the typical step size instead of an unbounded one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BASE_RULES",
    "MOMENT_KEYS",
    "directions",
    "init_state",
    "moment_kinds",
    "split_block",
    "transport",
]

BASE_RULES = ("sgd", "adam")
MOMENT_KEYS = {"first": ("K", "L", "S"), "second": ("K_sq", "L_sq", "S_sq")}
"""State keys of each kind of moment, in block order; the first letter gives the shape:
``K`` n × r_max, ``L`` m × r_max, ``S`` r_max × r_max."""


def moment_kinds(base_rule: str, momentum: float) -> tuple[str, ...]:
    """The kinds of moments (keys of :data:`MOMENT_KEYS`) a base rule keeps."""
    if base_rule == "adam":
        return ("first", "second")
    return ("first",) if momentum > 0 else ()


def init_state(n: int, m: int, r_max: int, base_rule: str, momentum: float, like: Tensor) -> dict:
    """Zero state for one adapter (full ``r_max`` size) and its step counter ``"step"``."""
    state: dict = {"step": torch.zeros((), dtype=torch.float32)}
    rows = {"K": n, "L": m, "S": r_max}
    for kind in moment_kinds(base_rule, momentum):
        for key in MOMENT_KEYS[kind]:
            state[key] = like.new_zeros(rows[key[0]], r_max)
    return state


def split_block(block: Tensor, n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``K``- (…, n, r), ``L``- (…, m, r) and ``S``-parts (…, r, r) of a block (…, ≥ n+m+r, r);
    rows beyond ``n + m + r`` are ignored."""
    r = block.shape[-1]
    return block[..., :n, :], block[..., n : n + m, :], block[..., n + m : n + m + r, :]


def directions(
    moments: dict[str, Tensor],
    grad: Tensor,
    steps: Tensor,
    base_rule: str,
    momentum: float,
    betas: tuple[float, float],
    eps: float,
) -> tuple[dict[str, Tensor], Tensor]:
    """Directions for the stacked gradient blocks ``grad`` (B, rows, r) and the moments of the
    same shape (``{kind: block}`` for :func:`moment_kinds`); ``steps`` (B,) are the adapters'
    step counts including this step. Returns ``(updated moments, directions)``; nothing is
    changed in place. Zero rows (of gradient and moments) give zero directions."""
    if base_rule == "sgd":
        if momentum == 0:
            return {}, grad
        first = moments["first"] * momentum + grad
        return {"first": first}, first
    beta1, beta2 = betas
    t = steps.to(torch.float64).view(-1, 1, 1)
    c1 = (1 - beta1**t).to(grad, non_blocking=True)
    c2 = (1 - beta2**t).to(grad, non_blocking=True)
    first = moments["first"].lerp(grad, 1 - beta1)
    second = torch.addcmul(moments["second"] * beta2, grad, grad, value=1 - beta2)
    return {"first": first, "second": second}, (first / c1) / ((second / c2).sqrt() + eps)


def transport(
    moments: dict[str, Tensor], n: int, m: int, c_u: Tensor, c_v: Tensor, live: Tensor
) -> dict[str, Tensor]:
    """The stacked active moment blocks (B, n + m + r, r) rewritten in the new bases: state
    tensors ``{key: (B, rows, k)}`` for the ``k`` rows of ``c_u``, ``c_v`` (B, k, r). Rows of
    ``C`` beyond an adapter's new rank ``r₁`` are zero and ``live`` (B, k) is 1 on the rows below
    ``r₁``, 0 beyond, so that every entry beyond ``r₁`` is zero. With ``w = min(rowsum(C∘C), 1)``
    the second-moment fill (see the module docstring) is ``mean_row(Q_K) (live − w_v)ᵀ`` for
    ``K`` (``L`` alike) and ``mean(Q_S) (live liveᵀ − w_u w_vᵀ)`` for ``S``."""
    out = {}
    c_ut, c_vt = c_u.transpose(-1, -2), c_v.transpose(-1, -2)
    if "first" in moments:
        k, l, s = split_block(moments["first"], n, m)
        out.update(K=k @ c_vt, L=l @ c_ut, S=c_u @ s @ c_vt)
    if "second" in moments:
        k, l, s = split_block(moments["second"], n, m)
        cu2, cv2 = c_u.square(), c_v.square()
        w_u, w_v = cu2.sum(-1).clamp(max=1), cv2.sum(-1).clamp(max=1)
        out["K_sq"] = _fill_new(k, k @ cv2.transpose(-1, -2), live - w_v)
        out["L_sq"] = _fill_new(l, l @ cu2.transpose(-1, -2), live - w_u)
        both = live.unsqueeze(-1) * live.unsqueeze(-2)
        missing_s = (both - w_u.unsqueeze(-1) * w_v.unsqueeze(-2)).clamp(min=0)
        moved_s = cu2 @ s @ cv2.transpose(-1, -2)
        out["S_sq"] = moved_s + s.mean(dim=(-2, -1), keepdim=True) * missing_s
    return out


def _fill_new(old_sq: Tensor, moved: Tensor, missing: Tensor) -> Tensor:
    """``moved`` plus the row means of ``old_sq`` (B, a, r) times the missing share (B, k) of
    each new column."""
    return moved + old_sq.mean(dim=-1, keepdim=True) * missing.unsqueeze(-2)
