"""What the loss gradient says about each map's planted change (issue 9's per-module recovery).

Every method of :mod:`planted_ranks` starts from the pretrained student (``ΔW = 0`` on all 36
maps), and GeoLoRA grows a map's rank only along directions its gradient keeps bringing in. This
script asks, at that starting point, how much of each map's planted change ``ΔW`` the map's own
gradient shows. For every map with a planted change of rank ``k`` (:mod:`planted`) it reports:

* **visible rank**: the numerical rank (GeoLoRA's rule, τ = 0.1: the dropped singular values have
  joint norm ``≤ τ ‖σ‖``) of the change ``X ΔWᵀ`` in the map's outputs on the training tokens
  (``X``: the map's inputs there). Equal to ``k`` when the data can tell the change's rank;
* for the **whole teacher** (all 27 planted changes at once, the benchmark's target) the gradient
  ``G = ∇_W L`` of the masked MSE to the teacher's last hidden states:

      cos = ⟨−G, ΔW⟩ / (‖G‖ ‖ΔW‖),      share = ‖U_kᵀ G V_k‖ / ‖G‖,

  where ``U_k``, ``V_k`` span the planted change's singular vectors; ``share`` is set beside the
  same quantity for a seeded random pair of ``k``-dimensional subspaces (what a gradient blind to
  the change would give), and the numerical rank of ``G`` (τ = 0.1);
* **alone**: the same for a teacher that carries only this map's change (the other maps
  unchanged), so the map's gradient holds no trace of the other maps' changes.

A map whose gradient points at its change has ``cos`` near 1 and a ``share`` near 1; a gradient
that sees only the activations' and the later layers' preferred directions has both near the
random baseline, and its numerical rank has nothing to do with ``k``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import common
import minilm
import planted
import torch
from torch import Tensor, nn

NAME = "planted_gradients"
TAU = 0.1
N_SENTENCES = 512  # of the planted training sentences
CHUNK = 128


def _inputs_and_gradients(
    model: nn.Module, modules: dict[str, nn.Linear], split: dict[str, Tensor], labels: Tensor
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The inputs of ``modules`` on the unmasked tokens and ``∇_W`` of the masked MSE to
    ``labels`` (summed over chunks of :data:`CHUNK` sentences, each its chunk's mean)."""
    inputs: dict[str, list[Tensor]] = {n: [] for n in modules}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: inputs[n].append(args[0].detach()))
        for n, m in modules.items()
    ]
    for m in modules.values():
        m.weight.grad = None
    try:
        for i in range(0, len(labels), CHUNK):
            mask = split["mask"][i : i + CHUNK]
            out = model(
                inputs_embeds=split["hidden"][i : i + CHUNK],
                attention_mask=mask,
                labels=labels[i : i + CHUNK],
            )
            out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    keep = split["mask"][: len(labels)].reshape(-1).bool()
    xs = {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in v])[keep] for n, v in inputs.items()}
    return xs, {n: m.weight.grad.detach().clone() for n, m in modules.items()}


def alignment(grad: Tensor, delta: Tensor, rank: int, gen: torch.Generator) -> dict[str, float]:
    """``cos(−G, ΔW)``, the share of ``G`` inside ``ΔW``'s rank-``rank`` singular subspaces,
    that share for a random pair of subspaces, and ``G``'s numerical rank (float64)."""
    g, d = -grad.double(), delta.double()
    u, _, vh = torch.linalg.svd(d, full_matrices=False)
    u_k, v_k = u[:, :rank], vh[:rank].T
    q_u = torch.linalg.qr(torch.randn(g.shape[0], rank, generator=gen, dtype=g.dtype))[0]
    q_v = torch.linalg.qr(torch.randn(g.shape[1], rank, generator=gen, dtype=g.dtype))[0]
    return {
        "cos": float((g * d).sum() / (g.norm() * d.norm())),
        "share": float((u_k.T @ g @ v_k).norm() / g.norm()),
        "random_share": float((q_u.T @ g @ q_v).norm() / g.norm()),
        "grad_rank": planted.numerical_rank(g, TAU),
    }


def measure(setup: planted.PlantedSetup, n_sentences: int) -> dict[str, dict[str, Any]]:
    """Per map: its planted rank, ``‖G‖ / ‖W‖`` and, where a change is planted, its visible
    rank and :func:`alignment` for the whole teacher and for the map's change alone (an
    unchanged map gets only its gradient's numerical rank)."""
    torch.set_num_threads(minilm.THREADS)
    d = planted.data(setup)
    teacher = planted.adapted_modules(planted.plant(planted.student(), setup)[0])
    student = planted.student()
    for p in student.parameters():
        p.requires_grad_(False)
    modules = planted.adapted_modules(student)
    for m in modules.values():
        m.weight.requires_grad_(True)
    split = {k: v[:n_sentences] for k, v in d["train"].items()}
    inputs, grads = _inputs_and_gradients(student, modules, split, split["labels"])
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for name, rank in sorted(d["planted"].items()):
        relative_grad = float(grads[name].norm() / modules[name].weight.detach().norm())
        if rank == 0:  # nothing to align with; how large and how low-rank its gradient is
            whole = {"grad_rank": planted.numerical_rank(grads[name], TAU)}
            rows[name] = {"planted": 0, "relative_grad": relative_grad, "whole": whole}
            continue
        delta = (teacher[name].weight - modules[name].weight).detach()
        weight = modules[name].weight
        original = weight.detach().clone()
        with torch.no_grad():  # the teacher with this map's change only, then W exactly back
            weight += delta
            alone = planted.hidden_states(student, split)
            weight.copy_(original)
        _, alone_grads = _inputs_and_gradients(student, {name: modules[name]}, split, alone)
        rows[name] = {
            "planted": rank,
            "visible_rank": planted.numerical_rank(inputs[name].double() @ delta.double().T, TAU),
            "relative_grad": relative_grad,
            "whole": alignment(grads[name], delta, rank, gen),
            "alone": alignment(alone_grads[name], delta, rank, gen),
        }
    return rows


def _mean(rows: list[dict[str, Any]], *path: str) -> float:
    values = []
    for r in rows:
        for key in path:
            r = r[key]
        values.append(float(r))
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    setup = planted.SMOKE if args.smoke else planted.PlantedSetup()
    n_sentences = setup.n_train if args.smoke else N_SENTENCES
    rows = measure(setup, n_sentences)
    lines = [
        f"Teacher and student of `planted_ranks.py` (relative norm {setup.relative_norm:g}, "
        f"plant seed {setup.plant_seed}); gradients of the masked MSE at the pretrained student "
        f"on its first {n_sentences} training sentences. Means over the maps of each planted "
        f"rank; ranks are numerical ranks at τ = {TAU:g}. cos = cos(−G, ΔW); share = "
        "‖U_kᵀ G V_k‖ / ‖G‖ in the planted change's singular subspaces (random: the same for "
        "random subspaces of its size). Whole = the benchmark's teacher; alone = a teacher "
        "with only this map's change.",
        "",
        "| planted rank | maps | visible rank | ‖G‖ / ‖W‖ | rank of G, whole / alone | "
        "cos, whole / alone | share, whole / alone | share, random |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for r in rows.values():
        by_rank.setdefault(r["planted"], []).append(r)
    zero = by_rank.pop(0, [])
    if zero:
        lines.append(
            f"| 0 | {len(zero)} | – | {_mean(zero, 'relative_grad'):.2e} | "
            f"{_mean(zero, 'whole', 'grad_rank'):.1f} / – | – | – | – |"
        )
    for rank, group in sorted(by_rank.items()):

        def both(key: str, fmt: str, group=group) -> str:
            return " / ".join(format(_mean(group, part, key), fmt) for part in ("whole", "alone"))

        lines.append(
            f"| {rank} | {len(group)} | {_mean(group, 'visible_rank'):.1f} | "
            f"{_mean(group, 'relative_grad'):.2e} | {both('grad_rank', '.1f')} | "
            f"{both('cos', '.3f')} | {both('share', '.3f')} | "
            f"{_mean(group, 'whole', 'random_share'):.3f} |"
        )
    lines += [
        "",
        "| map | planted | visible | rank of G, whole / alone | cos, whole / alone |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r["planted"] == 0:
            continue
        w, a = r["whole"], r["alone"]
        lines.append(
            f"| {name.removeprefix('bert.encoder.layer.')} | {r['planted']} | "
            f"{r['visible_rank']} | {w['grad_rank']} / {a['grad_rank']} | "
            f"{w['cos']:.3f} / {a['cos']:.3f} |"
        )
    payload = {"setup": dataclasses.asdict(setup), "n_sentences": n_sentences, "maps": rows}
    common.publish(NAME, "Planted ranks: what the gradient shows", lines, payload, args)
    return payload


if __name__ == "__main__":
    main()
