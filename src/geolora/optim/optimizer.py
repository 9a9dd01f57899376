"""GeoLoRAOptimizer: one ``step()`` = the geometric update of every adapter + AdamW on the rest.

Per adapter (spec §2): directions ``D_K, D_L, D_S`` from the base rule
(:mod:`geolora.optim.base_rules`), ``S₁ = (1 − λ·wd) S − λ D_S`` (decoupled weight decay of the
whole adapter), QR augmentation of both bases, the augmented coefficients, an SVD, the shrinkage of
the singular values (:func:`geolora.optim.integrator.shrink_singular_values`), the rank decision
(:mod:`geolora.optim.rank_rules`), the truncation, and the transport of the optimizer state to the
new bases. Adapters sharing a shape form buckets that are stepped as one batch each
(:mod:`geolora.optim.buckets`: ranks with ``2r ≤ min(n, m)`` grouped by width where padding all to
the widest would cost more QR than a batch costs, the narrower ones of a group zero-padded, see
:mod:`geolora.optim.integrator`; wider ones only with adapters of their own rank): gradients,
factors and moments are stacked with one copy each, the directions, QR, SVD, truncation and
transport run on the stacked tensors (each adapter keeps its own Adam step count, rank and new
rank), and factors and state go back with one copy per bucket.
The singular values of all layers reach the host in one transfer, which is the only device sync
of the step besides the finiteness check.

Other trainable parameters (heads, ``modules_to_save``) get an ordinary AdamW step inside the
same ``step()``, so learning-rate schedulers, gradient clipping and accumulation work as usual.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .._torch_compat import foreach_add_, foreach_copy_, foreach_norm
from ..config import GeoLoRAConfig
from ..layers import GeoLoRALayer, is_factor
from ..model import geolora_layers
from . import base_rules, integrator, rank_rules
from .base_rules import MOMENT_KEYS, SCALAR_KEYS, split_block
from .buckets import plan_buckets
from .guard import refuse_plain_optimizer
from .stacking import copy_whole, set_stacked_factors, write_leading

__all__ = ["GeoLoRAOptimizer"]


@dataclass
class _Bucket:
    """Adapters of one shape and rank between augmentation and truncation; every tensor is
    stacked along dim 0 in the order of ``layers``. ``moments`` is the updated active state."""

    layers: list[GeoLoRALayer]
    states: list[dict]
    r_max: int
    r_min: int
    moments: dict[str, Tensor]
    active: Tensor
    """Per adapter, its rank before the step (the bucket's width may be larger)."""
    u_aug: integrator.AugmentedBasis
    v_aug: integrator.AugmentedBasis
    p: Tensor
    sigma: Tensor
    qh: Tensor
    available: Tensor
    """Per adapter, the number of non-zero singular values of ``Ŝ`` before the shrinkage."""


register_optimizer_step_pre_hook(refuse_plain_optimizer)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the geometric step with one intra-op thread on CPU. Its QRs (n × 2r), SVDs (2r × 2r)
    and products are too small for threads to help; on a loaded CPU the threads wait on each
    other, which made the step of 12 MiniLM adapters up to 200× slower at 2 threads (7 s against
    36 ms; on a quiet machine the two are equal, see docs/benchmarks.md). GPU steps are
    untouched."""
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
        base_rule: ``"riemannian_adam_features"`` (default), ``"riemannian_adam"``,
            ``"riemannian_adam_rows"``, ``"adam"`` or ``"sgd"`` directions for the factors
            (spec §4, :mod:`geolora.optim.base_rules`).
        betas, eps: Adam constants (also for the AdamW step of the other parameters).
        momentum: heavy-ball momentum for ``base_rule="sgd"``.
        first_moment_correction: divide the adapters' first moments by ``1 − β₁ᵗ`` (Adam's bias
            correction; default ``True``). ``False`` uses ``M`` as it is, so that each adapter's
            step ramps up over its first steps (``(1 − β₁ᵗ) λ`` for a constant gradient: 0.1 λ
            at ``t = 1``, 0.65 λ at ``t = 10``): at a constant lr this makes the ranks depend
            less on the initial rank, but under any lr schedule it fits worse
            (docs/algorithm.md §8). Rules without first moments ignore it.
        other_lr: learning rate of the non-adapter parameters, if different.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        base_rule: str = base_rules.DEFAULT_BASE_RULE,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.0,
        first_moment_correction: bool = True,
        other_lr: float | None = None,
    ) -> None:
        base_rules.get_base_rule(base_rule)
        if lr <= 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(
                "Need lr > 0, weight_decay >= 0 and 0 <= momentum < 1; "
                f"got {lr}, {weight_decay}, {momentum}."
            )
        if not isinstance(first_moment_correction, bool):
            raise TypeError(
                f"first_moment_correction must be True or False, got {first_moment_correction!r}."
            )
        self.config = _find_config(model)
        self._layers = geolora_layers(model)
        if not self._layers:
            raise ValueError("No GeoLoRA layers found in the model.")
        factors = [p for layer in self._layers.values() for p in (layer.U, layer.S, layer.V)]
        others = [p for p in model.parameters() if p.requires_grad and not is_factor(p)]
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        geometric = dict(
            geolora=True,
            base_rule=base_rule,
            momentum=momentum,
            first_moment_correction=first_moment_correction,
            steps=0,
        )
        groups = [dict(params=factors, **geometric)]
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
        self._warned_no_gradient = False

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
        for group in self.param_groups:
            if group["geolora"]:  # saved before the option existed: the correction was applied
                group.setdefault("first_moment_correction", True)
        groups = {id(p): g for g in self.param_groups if g["geolora"] for p in g["params"]}
        for name, layer in self._layers.items():
            if layer.U in self.state:
                _one_column_row_moments(self.state[layer.U], groups[id(layer.U)])
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
        norms = foreach_norm(grads)
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
            rule = base_rules.get_base_rule(group["base_rule"])
            n, m = layer.out_features, layer.in_features
            state.update(rule.init_state(n, m, layer.r_max, _hyper(group), layer.U))
        return state

    def _geometric_step(self, group: dict) -> None:
        """Step every adapter with a gradient, in the buckets of
        :func:`geolora.optim.buckets.plan_buckets`, each stepped as one batch."""
        planned = plan_buckets(list(self._layers.values()))
        if not planned:
            self._warn_no_adapter_gradient()
            return
        buckets = [self._augment(layers, group) for layers in planned]
        new_ranks = self._choose_ranks(buckets, group["steps"])
        for bucket, ranks_b in zip(buckets, new_ranks):
            self._truncate(bucket, ranks_b, group)
        group["steps"] += 1

    def _warn_no_adapter_gradient(self) -> None:
        """Warn once when a step finds no adapter gradient: the adapters then never train."""
        if self._warned_no_gradient:
            return
        self._warned_no_gradient = True
        warnings.warn(
            "GeoLoRAOptimizer.step() found no gradient on any adapter, so no adapter changed. "
            "Check that the loss depends on the adapted modules; with reentrant gradient "
            "checkpointing on a frozen model (transformers < 5 does not do this for you), call "
            "model.enable_input_require_grads() before training.",
            stacklevel=3,
        )

    def _augment(self, layers: list[GeoLoRALayer], group: dict) -> _Bucket:
        """Base-rule directions, ``S₁ = (1 − λ·wd) S − λ D_S``, both augmentations, ``Ŝ``, its
        SVD and the shrunk singular values for the adapters of one bucket at once. Factors,
        gradients and moments are stacked as blocks (see :mod:`geolora.optim.base_rules`): one copy
        each for the whole bucket."""
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        n, m = layers[0].out_features, layers[0].in_features
        r_max, r_min = layers[0].U.shape[1], min(layers[0].r_min, layers[0].r_max)
        ranks_b = [layer.current_rank for layer in layers]
        r, rows = max(ranks_b), n + m + max(ranks_b)
        active = torch.tensor(ranks_b).to(layers[0].U.device, non_blocking=True)
        padded = active if min(ranks_b) < r else None
        rule, hyper = base_rules.get_base_rule(group["base_rule"]), _hyper(group)
        states = [self._layer_state(layer, group) for layer in layers]
        steps = [state["step"] for state in states]
        foreach_add_(steps, 1)
        moments = {}
        for kind in rule.kinds(hyper):
            if kind in SCALAR_KEYS:
                moments[kind] = torch.stack([st[SCALAR_KEYS[kind]] for st in states]).view(-1, 1, 1)
            else:
                blocks = [st[key] for st in states for key in MOMENT_KEYS[kind]]
                moments[kind] = _stack_blocks(blocks, r)[:, :rows]
        grad = _stack_blocks([t.grad for layer in layers for t in _factors(layer)], r)[:, :rows]
        moments, d = rule.directions(moments, grad, torch.stack(steps), hyper, active)
        u, v, s = split_block(_stack_blocks([t for la in layers for t in _factors(la)], r), n, m)
        d_k, d_l, d_s = split_block(d, n, m)
        u_aug = integrator.augment_basis(u, d_k, padded)
        v_aug = integrator.augment_basis(v, d_l, padded)
        s_hat = integrator.augmented_coefficients(decay * s - lr * d_s, u_aug, v_aug, lr)
        p, sigma, qh = torch.linalg.svd(s_hat, full_matrices=False)
        # the padding's zero σ may come out as rounding: at most rᵢ + min(rᵢ, n − rᵢ, m − rᵢ)
        own = active + torch.minimum(active, torch.minimum(n - active, m - active))
        available = torch.minimum((sigma > 0).sum(-1), own)
        if self.config.shrinkage > 0:
            step = integrator.augmented_coefficients(-lr * d_s, u_aug, v_aug, lr)
            sigma = integrator.shrink_singular_values(sigma, step, self.config.shrinkage)
        return _Bucket(
            layers, states, r_max, r_min, moments, active, u_aug, v_aug, p, sigma, qh, available
        )

    def _choose_ranks(self, buckets: list[_Bucket], step: int) -> list[list[int]]:
        """New ranks per bucket from all singular values, moved to the host in one transfer, by
        the config's rank rule (:mod:`geolora.optim.rank_rules`; τ = 0 during the warm-up)."""
        cfg = self.config
        if cfg.freeze_ranks_after is not None and step >= cfg.freeze_ranks_after:
            return [[layer.current_rank for layer in b.layers] for b in buckets]
        parts = [t for b in buckets for t in (b.sigma.reshape(-1), b.available.to(b.sigma))]
        moved = torch.cat(parts).double().cpu().split([t.numel() for t in parts])
        warming_up = step < cfg.warmup_steps
        rule = rank_rules.RANK_RULES["local"] if warming_up else rank_rules.rank_rule_for(cfg)
        groups = [
            rank_rules.LayerGroup(
                sigma=h.view_as(b.sigma),
                available=a.long(),
                current=[layer.current_rank for layer in b.layers],
                costs=[_value_cost(layer, cfg.budget_unit) for layer in b.layers]
                if rule.needs_costs
                else [],
                r_min=b.r_min,
                r_max=b.r_max,
            )
            for h, a, b in zip(moved[0::2], moved[1::2], buckets)
        ]
        return rule.choose(groups, cfg, 0.0 if warming_up else cfg.tau)

    def _truncate(self, bucket: _Bucket, new_ranks: list[int], group: dict) -> None:
        """Keep each adapter's ``r₁`` leading singular triplets, ``U ← Û P₁``, ``V ← V̂ Q₁``,
        ``S ← diag(σ₁..σ_{r₁})``, and transport the state with ``C = P₁ᵀ [r11; 0]`` (and alike).
        ``P₁`` and ``Q₁`` are the leading ``min(k, r_max)`` columns of ``P`` and ``Q`` with those
        beyond each adapter's ``r₁`` zeroed, so that one batched product serves adapters of
        different new ranks."""
        u_basis, v_basis = bucket.u_aug.basis, bucket.v_aug.basis
        width = min(bucket.r_max, bucket.sigma.shape[-1])
        r_new = torch.tensor(new_ranks).to(u_basis.device, non_blocking=True)
        keep = torch.arange(width, device=r_new.device) < r_new.unsqueeze(-1)
        p1 = bucket.p[..., :width].masked_fill(~keep.unsqueeze(-2), 0)
        q1 = bucket.qh[..., :width, :].transpose(-1, -2).masked_fill(~keep.unsqueeze(-2), 0)
        s = torch.diag_embed(bucket.sigma[..., :width].masked_fill(~keep, 0))
        set_stacked_factors(bucket.layers, u_basis @ p1, s, v_basis @ q1, new_ranks)
        c_u = integrator.coordinate_change(bucket.u_aug.r11, p1)
        c_v = integrator.coordinate_change(bucket.v_aug.r11, q1)
        n, m = u_basis.shape[-2], v_basis.shape[-2]
        rule = base_rules.get_base_rule(group["base_rule"])
        moved = rule.transport(bucket.moments, n, m, c_u, c_v, keep.to(u_basis), bucket.active)
        scalars = {k: moved.pop(k) for k in list(moved) if k in SCALAR_KEYS.values()}
        write_leading(
            [[state[key] for state in bucket.states] for key in moved], list(moved.values())
        )
        for key, stacked in scalars.items():
            foreach_copy_([state[key] for state in bucket.states], list(stacked.view(-1)))
        for state, r in zip(bucket.states, new_ranks):
            state["rank"] = r


def _one_column_row_moments(state: dict, group: dict) -> None:
    """Rewrite, in place, the row second moments of a state saved before geolora stored them in
    one column (``K_sq``, ``L_sq``, ``S_sq`` as full blocks whose active entries all held the
    row's value) as the one-column ``K_rsq``, ``L_rsq``, ``S_rsq`` the rule now reads."""
    kinds = base_rules.get_base_rule(group["base_rule"]).kinds(_hyper(group))
    if "row_second" not in kinds or "K_rsq" in state or "K_sq" not in state:
        return
    for old, new in zip(MOMENT_KEYS["second"], MOMENT_KEYS["row_second"]):
        state[new] = state.pop(old)[:, :1].clone()


def _value_cost(layer: GeoLoRALayer, unit: str) -> int:
    """What one kept singular value of ``layer`` costs: 1 rank or ``n + m + 1`` parameters."""
    return 1 if unit == "rank" else layer.out_features + layer.in_features + 1


def _hyper(group: dict) -> base_rules.Hyper:
    return base_rules.Hyper(
        group["momentum"], group["betas"], group["eps"], group["first_moment_correction"]
    )


def _factors(layer: GeoLoRALayer) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, V, S)``: the factors in block order."""
    return layer.U, layer.V, layer.S


def _stack_blocks(tensors: list[Tensor], r: int) -> Tensor:
    """Stack the active columns of ``[K₁, L₁, S₁, K₂, …]`` (full size) into blocks
    (B, n + m + r_max, r), copying whole tensors or only their active columns (see
    :func:`geolora.optim.stacking.copy_whole`); one-column state stays one column."""
    width = min(r, tensors[0].shape[-1])
    if copy_whole(tensors[0], tensors[0].shape[0], width):
        return torch.cat(tensors).view(len(tensors) // 3, -1, tensors[0].shape[-1])[..., :width]
    return torch.cat([t[:, :width] for t in tensors]).view(len(tensors) // 3, -1, width)
