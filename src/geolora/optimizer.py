"""GeoLoRAOptimizer: one ``step()`` = the geometric update of every adapter + AdamW on the rest.

Per adapter (spec §2): directions ``D_K, D_L, D_S`` from the base rule (:mod:`geolora.base_rules`),
``S₁ = (1 − λ·wd) S − λ D_S`` (decoupled weight decay of the whole adapter), QR augmentation of
both bases, the augmented coefficients, an SVD, the rank decision (:mod:`geolora.ranks`), the
truncation, and the transport of the optimizer state to the new bases. Adapters sharing a shape
and rank are batched through one QR/SVD call; the singular values of all layers reach the host
in one transfer, which is the only device sync of the step besides the finiteness check.

Other trainable parameters (heads, ``modules_to_save``) get an ordinary AdamW step inside the
same ``step()``, so learning-rate schedulers, gradient clipping and accumulation work as usual.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import base_rules, integrator, ranks
from .config import GeoLoRAConfig
from .layers import GeoLoRALayer, is_factor
from .model import geolora_layers

__all__ = ["GeoLoRAOptimizer"]


@dataclass
class _Pending:
    """One adapter between augmentation and truncation."""

    name: str
    layer: GeoLoRALayer
    u_aug: integrator.AugmentedBasis | None = None
    v_aug: integrator.AugmentedBasis | None = None
    p: Tensor | None = None
    sigma: Tensor | None = None
    qh: Tensor | None = None


_checked_optimizers: weakref.WeakSet = weakref.WeakSet()


def _warn_plain_optimizer(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global step pre-hook: an ordinary optimizer about to step GeoLoRA factors would destroy
    the bases (``U.grad`` holds ``G_K = G V``, not the gradient of ``U``). Checked once per
    optimizer, so the hook costs one set lookup per step afterwards."""
    if optimizer in _checked_optimizers:
        return
    _checked_optimizers.add(optimizer)
    if isinstance(optimizer, GeoLoRAOptimizer):
        return
    n_factors = sum(is_factor(p) for g in optimizer.param_groups for p in g["params"])
    if n_factors:
        warnings.warn(
            f"{type(optimizer).__name__} is stepping {n_factors} GeoLoRA factor tensors (U, S, V). "
            "Their .grad fields are not plain gradients, and an ordinary optimizer step corrupts "
            "the adapters. Use GeoLoRAOptimizer(model, ...) for GeoLoRA models.",
            RuntimeWarning,
            stacklevel=3,
        )


register_optimizer_step_pre_hook(_warn_plain_optimizer)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the geometric step with one intra-op thread on CPU. Its QRs (n × 2r), SVDs (2r × 2r)
    and products are too small for threads to help; on a loaded CPU the threads wait on each
    other, which made the step of 12 MiniLM adapters 200× slower at 2 threads (7 s against 36 ms,
    see benchmarks/results/step_overhead.md). GPU steps are untouched."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _find_config(model: nn.Module) -> GeoLoRAConfig:
    for module in model.modules():
        config = getattr(module, "geolora_config", None)
        if isinstance(config, GeoLoRAConfig):
            return config
    raise ValueError(
        "This model has no GeoLoRA adapters: call get_geolora_model(model, config) first."
    )


class GeoLoRAOptimizer(torch.optim.Optimizer):
    """Optimizer for a model prepared with :func:`geolora.get_geolora_model`.

    Args:
        model: the GeoLoRA model (or a DDP wrapper of it).
        lr: learning rate ``λ`` of the adapters and (unless ``other_lr``) of the other parameters.
        weight_decay: decoupled weight decay for the adapters and the other parameters.
        base_rule: ``"adam"`` or ``"sgd"`` directions for the factors (spec §4).
        betas, eps: Adam constants (also for the AdamW step of the other parameters).
        momentum: heavy-ball momentum for ``base_rule="sgd"``.
        other_lr: learning rate of the non-adapter parameters, if different.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        base_rule: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.0,
        other_lr: float | None = None,
    ) -> None:
        if base_rule not in base_rules.BASE_RULES:
            raise ValueError(
                f"base_rule must be one of {base_rules.BASE_RULES}, got {base_rule!r}."
            )
        if lr <= 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(
                "Need lr > 0, weight_decay >= 0 and 0 <= momentum < 1; "
                f"got {lr}, {weight_decay}, {momentum}."
            )
        self.config = _find_config(model)
        self._layers = geolora_layers(model)
        if not self._layers:
            raise ValueError("No GeoLoRA layers found in the model.")
        factors = [p for layer in self._layers.values() for p in (layer.U, layer.S, layer.V)]
        others = [p for p in model.parameters() if p.requires_grad and not is_factor(p)]
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        groups = [
            dict(params=factors, geolora=True, base_rule=base_rule, momentum=momentum, steps=0)
        ]
        if others:
            groups.append(dict(params=others, geolora=False, lr=other_lr or lr))
            if base_rule == "sgd" and other_lr is None and lr > 1e-2:
                warnings.warn(
                    f"base_rule='sgd' with lr={lr}: the other trainable parameters "
                    f"({len(others)} tensors, e.g. a classifier head) get AdamW at the same lr, "
                    "which is likely far too large for AdamW. Pass other_lr (e.g. 1e-3).",
                    stacklevel=2,
                )
        super().__init__(groups, defaults)
        self._names = {id(p): n for n, p in model.named_parameters()}

    # --- public ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One GeoLoRA step. Raises FloatingPointError, changing nothing, on NaN/inf gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_finite()
        for group in self.param_groups:
            if group["geolora"]:
                with _one_cpu_thread(group["params"][0].device):
                    self._geometric_step(group)
            else:
                self._adamw_step(group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for name, layer in self._layers.items():
            saved = self.state.get(layer.U, {}).get("rank")
            if saved is not None and int(saved) != layer.current_rank:
                raise ValueError(
                    f"Optimizer state for {name!r} was saved at rank {int(saved)}, but the model "
                    f"has rank {layer.current_rank}: load the model checkpoint saved with it first."
                )

    # --- internals --------------------------------------------------------------------------
    def _check_finite(self) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        if bool(torch.stack(norms).isfinite().all()):
            return
        bad = [
            self._names.get(id(p), "?")
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and not bool(p.grad.isfinite().all())
        ]
        raise FloatingPointError(
            f"Non-finite gradients (NaN or inf) in {bad[:5]}{' ...' if len(bad) > 5 else ''}: "
            "step refused, no parameter changed. Lower the learning rate, clip gradients, or use "
            "a GradScaler with fp16."
        )

    def _adamw_step(self, group: dict) -> None:
        params, grads, avgs, sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            adamw(
                params,
                grads,
                avgs,
                sqs,
                [],
                steps,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )

    def _layer_state(self, layer: GeoLoRALayer, group: dict) -> dict:
        state = self.state[layer.U]
        if not state:
            state.update(
                base_rules.init_state(
                    layer.out_features,
                    layer.in_features,
                    layer.r_max,
                    group["base_rule"],
                    group["momentum"],
                    layer.U,
                )
            )
        return state

    def _geometric_step(self, group: dict) -> None:
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        buckets: dict[tuple, list[tuple[_Pending, dict]]] = defaultdict(list)
        for name, layer in self._layers.items():
            if layer.U.grad is None:
                continue
            r = layer.current_rank
            state = self._layer_state(layer, group)
            grads = {"K": layer.U.grad[:, :r], "L": layer.V.grad[:, :r], "S": layer.S.grad[:r, :r]}
            d = base_rules.directions(
                state, grads, r, group["base_rule"], group["momentum"], group["betas"], group["eps"]
            )
            u, s, v = (t.detach() for t in layer.active_factors())
            tensors = {"U": u, "V": v, "DK": d["K"], "DL": d["L"], "S1": decay * s - lr * d["S"]}
            key = (layer.out_features, layer.in_features, r, layer.r_max, u.dtype, u.device)
            buckets[key].append((_Pending(name, layer), tensors))
        pending: list[_Pending] = []
        for (_, _, r, r_max, _, _), items in buckets.items():
            stacked = {k: torch.stack([t[k] for _, t in items]) for k in items[0][1]}
            u_aug = integrator.augment_basis(stacked["U"], stacked["DK"], r_max - r)
            v_aug = integrator.augment_basis(stacked["V"], stacked["DL"], r_max - r)
            s_hat = integrator.augmented_coefficients(stacked["S1"], u_aug, v_aug, lr)
            p, sigma, qh = torch.linalg.svd(s_hat, full_matrices=False)
            for i, (item, _) in enumerate(items):
                item.u_aug = integrator.AugmentedBasis(u_aug.basis[i], u_aug.r11[i], u_aug.r22[i])
                item.v_aug = integrator.AugmentedBasis(v_aug.basis[i], v_aug.r11[i], v_aug.r22[i])
                item.p, item.sigma, item.qh = p[i], sigma[i], qh[i]
                pending.append(item)
        if not pending:
            return
        new_ranks = self._choose_ranks(pending, group["steps"])
        for item, r_new in zip(pending, new_ranks):
            self._apply(item, r_new, group)
        group["steps"] += 1

    def _choose_ranks(self, pending: list[_Pending], step: int) -> list[int]:
        cfg = self.config
        sizes = [len(item.sigma) for item in pending]
        host = torch.cat([item.sigma for item in pending]).double().cpu().split(sizes)
        r_min = [min(item.layer.r_min, item.layer.r_max) for item in pending]
        r_max = [item.layer.r_max for item in pending]
        if cfg.freeze_ranks_after is not None and step >= cfg.freeze_ranks_after:
            return [item.layer.current_rank for item in pending]
        if step < cfg.warmup_steps:
            return [int(ranks.local_ranks(s, 0.0, lo, hi)) for s, lo, hi in zip(host, r_min, r_max)]
        if cfg.budget is not None:
            costs = [
                1 if cfg.budget_unit == "rank" else i.layer.out_features + i.layer.in_features + 1
                for i in pending
            ]
            return ranks.budget_ranks(host, cfg.budget, costs, r_min, r_max)
        if cfg.truncation == "global":
            return ranks.global_tau_ranks(host, cfg.tau, r_min, r_max)
        return [int(ranks.local_ranks(s, cfg.tau, lo, hi)) for s, lo, hi in zip(host, r_min, r_max)]

    def _apply(self, item: _Pending, r_new: int, group: dict) -> None:
        layer, r_old = item.layer, item.layer.current_rank
        u_new, sigma, v_new, p1, q1 = integrator.truncate(
            item.u_aug.basis, item.v_aug.basis, item.p, item.sigma, item.qh, r_new
        )
        state = self.state[layer.U]
        c_u = integrator.coordinate_change(item.u_aug.r11, p1)
        c_v = integrator.coordinate_change(item.v_aug.r11, q1)
        base_rules.transport_state(state, r_old, r_new, c_u, c_v)
        layer.set_factors(u_new, sigma, v_new)
        state["rank"] = r_new
