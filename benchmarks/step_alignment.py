"""How much of the gradient each first step follows, on the planted teacher (issue 9).

GeoLoRA's first steps overshoot where LoRA's do not (``planted_steps.py``, ``llm_lr.py``). The
explanation offered in docs/llm.md: after one step GeoLoRA's bases hold the leading singular
directions of the gradient, so its per-entry normalised step follows the gradient far more
closely than LoRA's, whose ``A`` is still nearly random. This script measures that. It trains
GeoLoRA with the base rule ``riemannian_adam`` (the default until 2026-12-07; the library's other
defaults, and at a fixed rank 16) and peft LoRA r=16 at lr 1e-3 on the teacher,
data, batches and seed of :mod:`planted_ranks` for its 300 steps, and for each step ``t`` of
the first and the last ``WINDOW`` it reads

* ``G`` = ∂L/∂W of every adapted map on the step's batch (the frozen base weights are given
  ``requires_grad`` on the measured steps only; the optimizers were built without them, so they
  never move), and
  the optimizer's change ``ΔW`` of every map;
* the alignment ``cos = −⟨G, ΔW⟩ / (‖G‖_F ‖ΔW‖_F)`` (median over maps: 1 means the step points
  straight down the gradient);
* the step's size ``Σ‖ΔW‖_F / Σ‖W‖_F``;
* the first-order prediction of the loss change on the same batch, ``Σ⟨G, ΔW⟩``, against the
  change measured by evaluating that batch again after the step. When the measured change is
  far above the prediction (or positive), the step overshoots;
* for GeoLoRA (``riemannian_adam``) the two factors of its per-entry step size
  ``RMS(M̂)/√q̂``: the memory ``√mean(G∘G)/√q̂`` and the momentum ``RMS(M̂)/√mean(G∘G)``
  (both 1 at the first step), to tell a second moment that remembers larger gradients from
  successive gradients that cancel.
"""

from __future__ import annotations

import statistics
from typing import Any

import common
import planted
import torch
from methods import delta_weights, prepare

NAME = "step_alignment"
WINDOW = 10
SCALAR = {"base_rule": "riemannian_adam"}
RUNS = (
    ("GeoLoRA (riemannian_adam)", "geolora", SCALAR),
    (
        "GeoLoRA fixed r=16",
        "geolora",
        {"r": 16, "freeze_ranks_after": 0, "shrinkage": 0.0} | SCALAR,
    ),
    ("LoRA r=16", "lora", {"r": 16, "lora_alpha": 32.0}),
)
LR = 1e-3


def _base_weights(prep) -> dict[str, torch.nn.Parameter]:
    """The frozen base weight of every adapted map, by the names of :func:`delta_weights`."""
    prefix = "" if prep.method == "geolora" else "base_model.model."
    return {
        name: prep.model.get_submodule(prefix + name).base_layer.weight
        for name in delta_weights(prep)
    }


def _riemannian_adam_ratios(prep) -> dict[str, float]:
    """For GeoLoRA's ``riemannian_adam``, before its step (gradients in place), the two factors
    of its per-entry step size ``RMS(M̂)/√q̂``, median over adapters: ``memory`` =
    ``√mean(G∘G) / √q̂`` (below 1 when earlier gradients were larger) and ``momentum`` =
    ``RMS(M̂) / √mean(G∘G)`` (below 1 when successive gradients cancel), with this step's
    ``M = β₁M + (1−β₁)G`` and ``q = β₂q + (1−β₂)·mean(G∘G)`` over the active blocks."""
    from geolora import geolora_layers
    from geolora.optim.base_rules import MOMENT_KEYS, SCALAR_KEYS

    opt = prep.optimizer
    group = next(g for g in opt.param_groups if g["geolora"])
    if group["base_rule"] != "riemannian_adam":
        return {}
    beta1, beta2 = group["betas"]
    scalar, (key_k, key_l, key_s) = SCALAR_KEYS["scalar_second"], MOMENT_KEYS["first"]
    memory, momentum = [], []
    for layer in geolora_layers(prep.model).values():
        r, state = layer.current_rank, opt.state.get(layer.U, {})
        grads = (layer.U.grad[:, :r], layer.V.grad[:, :r], layer.S.grad[:r, :r])
        t = int(state.get("step", 0)) + 1
        mean_sq = sum(float(g.square().sum()) for g in grads) / sum(g.numel() for g in grads)
        old_q = float(state[scalar]) if state else 0.0
        q_hat = (beta2 * old_q + (1 - beta2) * mean_sq) / (1 - beta2**t)
        if state:
            olds = (state[key_k][:, :r], state[key_l][:, :r], state[key_s][:r, :r])
            first = [beta1 * o + (1 - beta1) * g for o, g in zip(olds, grads)]
        else:
            first = [(1 - beta1) * g for g in grads]
        m_sq = sum(float(f.square().sum()) for f in first) / sum(g.numel() for g in grads)
        rms_m_hat = m_sq**0.5 / (1 - beta1**t)
        memory.append((mean_sq / q_hat) ** 0.5)
        momentum.append(rms_m_hat / mean_sq**0.5)
    return {"memory": statistics.median(memory), "momentum": statistics.median(momentum)}


def _measure(prep, weights, batch, labels, norm_w: float) -> dict[str, float]:
    """One optimizer step on ``batch`` and what it did (see the module docstring)."""
    loss = prep.model(**batch, labels=labels).loss  # the masked MSE (no AdaLoRA here)
    loss.backward()
    start = float(loss.detach())
    ratios = _riemannian_adam_ratios(prep) if prep.method == "geolora" else {}
    grads = {n: w.grad.detach().clone() for n, w in weights.items()}
    before = delta_weights(prep)
    prep.optimizer.step()
    prep.optimizer.zero_grad(set_to_none=True)
    for w in weights.values():
        w.grad = None
    after = delta_weights(prep)
    moves = {n: after[n] - before[n] for n in after}
    inner = {n: float((grads[n] * moves[n]).sum()) for n in moves}
    cos = [-inner[n] / max(float(grads[n].norm() * moves[n].norm()), 1e-30) for n in moves]
    with torch.no_grad():
        again = prep.model(**batch, labels=labels).loss
    return {
        "t": prep.step,
        "loss": start,
        "alignment": statistics.median(cos),
        "step": sum(float(m.norm()) for m in moves.values()) / norm_w,
        "predicted": sum(inner.values()),
        "measured": float(again) - start,
        **ratios,
    }


def measured_steps(method: str, hyper: dict[str, Any], setup, window: int) -> list[dict]:
    """Train ``setup.steps`` steps; for the first and last ``window`` of them, what each step
    did: median alignment over maps, relative step size, predicted and measured loss change
    on the step's batch (see the module docstring)."""
    torch.set_num_threads(common.THREADS)
    d = planted.data(setup)
    torch.manual_seed(0)
    prep = prepare(method, {"lr": LR, **hyper}, planted.student(), setup.steps, heads=[])
    prep.model.eval()  # no dropout: a clean regression, as in planted_ranks
    weights = _base_weights(prep)
    norm_w = sum(float(w.norm()) for w in weights.values())
    frozen = {n: w.detach().clone() for n, w in weights.items()}
    rows = []
    order = common.batch_order(len(d["train"]["labels"]), setup.batch_size, setup.steps, seed=0)
    for t, idx in enumerate(order):
        batch, labels = common.take_batch(d["train"], idx)
        measured = t < window or t >= setup.steps - window
        for w in weights.values():  # the dense gradient only where it is measured
            w.requires_grad_(measured)
        if measured:
            rows.append(_measure(prep, weights, batch, labels, norm_w))
        else:
            prep.model(**batch, labels=labels).loss.backward()
            prep.optimizer.step()
            prep.optimizer.zero_grad(set_to_none=True)
        prep.step += 1
    moved = [n for n, w in weights.items() if not torch.equal(w.detach(), frozen[n])]
    if moved:  # the measurement would then be of a different method
        raise RuntimeError(f"the optimizer moved frozen base weights: {moved[:3]}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    setup = planted.SMOKE if args.smoke else planted.PlantedSetup()
    window = 2 if args.smoke else WINDOW
    results = {}
    for label, method, hyper in RUNS:
        print(f"{label} ...", flush=True)
        results[label] = measured_steps(method, hyper, setup, window)
    shown_t = [r["t"] for r in next(iter(results.values()))]
    lines = [
        f"Planted teacher of `planted_ranks.py` (batch {setup.batch_size}, seed 0, lr {LR:g}, "
        f"constant, {setup.steps} steps), the first and last {window} steps, on the same batches. "
        "Per step: median over the 36 "
        "maps of the alignment −⟨G, ΔW⟩/(‖G‖‖ΔW‖); step size Σ‖ΔW‖/Σ‖W‖ (×10³); the loss change "
        "on the step's own batch predicted to first order, Σ⟨G, ΔW⟩, and measured by evaluating "
        "the batch again (×10³; the batch loss before the step is about 8 ×10⁻³).",
        "",
        "| run | quantity | " + " | ".join(f"t={t}" for t in shown_t) + " |",
        "|---|---|" + "---|" * len(shown_t),
    ]
    shown = (
        ("alignment", "alignment", 1.0, "{:.3f}"),
        ("step size", "step", 1e3, "{:.2f}"),
        ("predicted change", "predicted", 1e3, "{:+.2f}"),
        ("measured change", "measured", 1e3, "{:+.2f}"),
        ("memory √mean(G∘G)/√q̂", "memory", 1.0, "{:.2f}"),
        ("momentum RMS(M̂)/√mean(G∘G)", "momentum", 1.0, "{:.2f}"),
    )
    for label, rows in results.items():
        for name, key, scale, fmt in shown:
            if key not in rows[0]:
                continue  # the step-size factors exist for riemannian_adam only
            cells = " | ".join(fmt.format(scale * r[key]) for r in rows)
            lines.append(f"| {label} | {name} | {cells} |")
    common.publish(NAME, "First steps: alignment with the gradient", lines, results, args)
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
