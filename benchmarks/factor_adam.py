"""Adam for peft LoRA's factors with a chosen granularity of the second moment (issue 9).

GeoLoRA's default rule normalises each adapter's step by one scalar, peft LoRA's AdamW by one
second moment per coordinate of ``A`` (r × in) and ``B`` (out × r). To tell whether the planted
gap between them comes from that choice, LoRA is trained here with each granularity in between.
For an adapter with gradients ``g_A``, ``g_B``:

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) · mean_R(g ∘ g),
    p ← p − λ (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ)) + ε)

where ``R`` is the set of entries that share a second moment:

* ``coordinate``: each entry alone (Adam; no weight decay, so AdamW with ``weight_decay=0``);
* ``feature``: each ambient feature, a column of ``A`` (an input) and a row of ``B`` (an output);
* ``channel``: each of the r channels, a row of ``A`` and a column of ``B``;
* ``tensor``: all of ``A``, and all of ``B``;
* ``adapter``: all of ``A`` and ``B`` together (GeoLoRA's default rule's granularity).

``feature`` and ``adapter`` do not depend on the channels' coordinates (a rotation ``A → QA``,
``B → BQᵀ`` leaves them unchanged); ``coordinate``, ``channel`` and ``tensor`` do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GRANULARITIES = ("coordinate", "feature", "channel", "tensor", "adapter")
_REDUCED_DIMS = {  # dims of (A: r × in, B: out × r) averaged into one second moment
    "coordinate": ((), ()),
    "feature": ((0,), (1,)),
    "channel": ((1,), (0,)),
    "tensor": ((0, 1), (0, 1)),
}


class FactorAdam(torch.optim.Optimizer):
    """Adam over parameter groups that each hold one adapter's ``[A, B]`` (see the module
    docstring); ``granularity`` is one of :data:`GRANULARITIES`."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        granularity: str,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
        for group in groups:
            if len(group["params"]) != 2:
                raise ValueError("each group must hold one adapter's [A, B].")
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps))
        self.granularity = granularity

    def _mean_squares(self, grads: list[Tensor]) -> list[Tensor]:
        if self.granularity == "adapter":
            total = sum(g.square().sum() for g in grads) / sum(g.numel() for g in grads)
            return [total.view(1, 1), total.view(1, 1)]
        dims = _REDUCED_DIMS[self.granularity]
        return [
            g.square().mean(dim=d, keepdim=True) if d else g.square() for g, d in zip(grads, dims)
        ]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params = group["params"]
            if any(p.grad is None for p in params):
                continue
            beta1, beta2 = group["betas"]
            squares = self._mean_squares([p.grad for p in params])
            for p, square in zip(params, squares):
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(square))
                state["t"] += 1
                t = state["t"]
                state["m"].lerp_(p.grad, 1 - beta1)
                state["v"].lerp_(square, 1 - beta2)
                denom = (state["v"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["m"], denom, value=-group["lr"] / (1 - beta1**t))
        return loss


def for_lora(model: nn.Module, granularity: str, lr: float) -> FactorAdam:
    """A :class:`FactorAdam` over every trainable peft LoRA adapter of ``model`` (one group per
    adapted module and adapter name)."""
    groups = []
    for module in model.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        for name in lora_a:
            pair = [lora_a[name].weight, lora_b[name].weight]
            if all(p.requires_grad for p in pair):
                groups.append({"params": pair})
    if not groups:
        raise ValueError("the model has no trainable peft LoRA adapters.")
    return FactorAdam(groups, lr, granularity)
