"""Base update rules for the factors (spec §4) and the transport of their state to a new basis.

The integrator needs, per adapter, update directions ``D_K``, ``D_L``, ``D_S`` for
``K = U S`` (n × r), ``L = V Sᵀ`` (m × r) and ``S`` (r × r), given their gradients ``G_*``:

* ``sgd``: ``D = G``, or with momentum ``μ``: ``B ← μ B + G``, ``D = B`` (the paper's form).
* ``adam``: ``M ← β₁M + (1−β₁)G``, ``Q ← β₂Q + (1−β₂)G∘G``,
  ``D = (M / (1−β₁ᵗ)) / (sqrt(Q / (1−β₂ᵗ)) + ε)``.

State lives in fixed-size tensors (rank ``r_max``) of which the leading ``r`` columns are active.
After the step moves the basis, each state is rewritten in the new coordinates with the maps
``C_u``, ``C_v`` (r₁ × r, from :func:`geolora.integrator.coordinate_change`). Columns of K are
indexed by the V-side basis and columns of L by the U-side basis, so

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

__all__ = ["BASE_RULES", "directions", "init_state", "transport_state"]

BASE_RULES = ("sgd", "adam")
_FIRST = ("K", "L", "S")
_SECOND = ("K_sq", "L_sq", "S_sq")


def init_state(n: int, m: int, r_max: int, base_rule: str, momentum: float, like: Tensor) -> dict:
    """Zero state for one adapter (full ``r_max`` size)."""
    state: dict = {"step": torch.zeros((), dtype=torch.float32)}
    shapes = {"K": (n, r_max), "L": (m, r_max), "S": (r_max, r_max)}
    keys = []
    if base_rule == "adam":
        keys = list(_FIRST) + list(_SECOND)
    elif momentum > 0:
        keys = list(_FIRST)
    for key in keys:
        state[key] = like.new_zeros(shapes[key[0]])
    return state


def _active(state: dict, key: str, r: int) -> Tensor:
    t = state[key]
    return t[:r, :r] if key[0] == "S" else t[:, :r]


def directions(
    state: dict,
    grads: dict[str, Tensor],
    r: int,
    base_rule: str,
    momentum: float,
    betas: tuple[float, float],
    eps: float,
) -> dict[str, Tensor]:
    """Update the state in place with gradients ``{"K", "L", "S"}`` and return the directions."""
    state["step"] += 1
    if base_rule == "sgd":
        if momentum == 0:
            return grads
        out = {}
        for key, g in grads.items():
            buf = _active(state, key, r)
            buf.mul_(momentum).add_(g)
            out[key] = buf.clone()
        return out
    beta1, beta2 = betas
    step = float(state["step"])
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    out = {}
    for key, g in grads.items():
        m, q = _active(state, key, r), _active(state, key + "_sq", r)
        m.lerp_(g, 1 - beta1)
        q.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        out[key] = (m / c1) / ((q / c2).sqrt() + eps)
    return out


def _fill_new(old_sq: Tensor, moved: Tensor, missing: Tensor, dim: int) -> Tensor:
    """Add the mean of ``old_sq`` along ``dim`` times the missing share of each new column."""
    return moved + old_sq.mean(dim=dim, keepdim=True) * missing


def transport_state(state: dict, r: int, r_new: int, c_u: Tensor, c_v: Tensor) -> None:
    """Rewrite the state of an adapter that moved from rank ``r`` to ``r_new`` in the new bases
    (see the module docstring)."""
    if "K" not in state:
        return
    old = {key: _active(state, key, r).clone() for key in state if key in _FIRST + _SECOND}
    new = {
        "K": old["K"] @ c_v.t(),
        "L": old["L"] @ c_u.t(),
        "S": c_u @ old["S"] @ c_v.t(),
    }
    if "K_sq" in old:
        cu2, cv2 = c_u.square(), c_v.square()
        miss_u = (1 - cu2.sum(-1)).clamp(min=0)
        miss_v = (1 - cv2.sum(-1)).clamp(min=0)
        new["K_sq"] = _fill_new(old["K_sq"], old["K_sq"] @ cv2.t(), miss_v, dim=1)
        new["L_sq"] = _fill_new(old["L_sq"], old["L_sq"] @ cu2.t(), miss_u, dim=1)
        missing_s = (1 - torch.outer(1 - miss_u, 1 - miss_v)).clamp(min=0)
        moved_s = cu2 @ old["S_sq"] @ cv2.t()
        new["S_sq"] = moved_s + old["S_sq"].mean() * missing_s
    for key, value in new.items():
        state[key].zero_()
        _active(state, key, r_new).copy_(value)
