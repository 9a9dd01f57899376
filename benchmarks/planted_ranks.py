"""Planted ranks (issue 9): does each method find the rank of a known change, per module?

The teacher is all-MiniLM-L6-v2 with planted changes of rank 0 / 2 / 8 / 24 on its 36 linear
maps, the student the pretrained model with adapters on the same maps, fitted to the teacher's
last hidden states (:mod:`planted`). Methods, each run once (seed 0):

* GeoLoRA from r = 1, 4, 16 with the library's defaults (optimizer and config), the same with
  Adam's first-moment bias correction set either way (``M̂ corrected``:
  ``first_moment_correction=True``, the first steps move at full size; ``M̂ uncorrected``:
  ``False``, each adapter's step ramps up; labels that keep meaning the same whatever the
  default), and the same with ``truncation="global"`` (one τ over the singular values of all 36
  maps);
* the same from r = 1, 4, 16 with ``base_rule="riemannian_adam_rows"`` (each feature's step
  capped), with ``base_rule="riemannian_adam_features"`` (one second moment per feature; the
  default since 2026-12-07, so these rows repeat the default's under another cache key), with
  ``base_rule="riemannian_adam"`` (the default until then), the features rule with
  ``shrinkage=0.05``, and the default, the features rule and ``riemannian_adam`` under a 30-step
  linear lr warm-up (:func:`common.linear_warmup`), beside LoRA r = 16 under the same warm-up,
  and the same three, and the default with the first moment set either way, under
  ``geolora finetune``'s whole schedule (that warm-up, then a linear decay to 0), beside
  LoRA r = 8 / 16 and AdaLoRA under that schedule;
* GeoLoRA at a fixed rank 16 (``freeze_ranks_after=0``, no shrinkage): the integrator and base
  rule without any rank decision, to tell a loss gap of the optimizer from one of the ranks; the
  same under the schedule, with the first moment set either way;
* an lr sweep (1e-3 / 2e-3 / 3e-3) under the warm-up: the features rule with its rank rule, with
  an exact budget of the planted parameters and at a fixed rank 8, the default rule, and LoRA r=8;
* peft LoRA r = 4 / 8 / 16 (``lora_alpha = 2r``, AdamW);
* peft AdaLoRA from ``init_r = 32`` to ``target_r = ⌊planted total rank / 36⌋`` (its budget is
  ``target_r`` per module on average, the largest one within the planted total), and from
  ``init_r = target_r + 1`` (nearly a fixed rank: AdaLoRA's SVD-form factors without much of a
  rank schedule);
* peft LoRA r = 32, then truncated by peft's own ``convert_to_lora`` / ``save_as_lora``
  (``peft.tuners.lora.conversion``) to the planted total rank: with an energy threshold (the
  largest threshold whose total rank fits the planted total, found by bisection; ranks then
  differ per module) and with one uniform rank (⌊planted total / 36⌋).

Per module the table gives the rank found: GeoLoRA's current rank, AdaLoRA's unmasked triplets,
the truncation's kept rank; for plain LoRA the numerical rank of the learned ΔW (the smallest
``k`` whose dropped singular values have joint norm ``≤ 0.1 ‖σ‖``, GeoLoRA's default rule).
A module counts as recovered when the rank found is within ±20 % of the planted one (±1 for
planted ranks ≤ 5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import common
import factor_adam
import lora_truncation
import minilm
import planted
import torch
from methods import Prepared, delta_weights, parameter_counts, prepare

NAME = "planted_ranks"
SCALAR_RULE = "riemannian_adam"  # the default base rule until 2026-12-07
LORA_LR = 1e-3
ADALORA_LR = 3e-3  # AdaLoRA needs 2.5-5x LoRA's lr (issue 9)
NUMERICAL_TAU = 0.1


def specs(
    budget_rank: int, n_modules: int, budget_params: int, smoke: bool
) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, hyper) of every run; GeoLoRA gets no lr (the optimizer's default) outside
    the lr sweep (:func:`_lr_sweep`)."""
    target_r = budget_rank // n_modules
    starts = (1, 16) if smoke else (1, 4, 16)
    rows = [(f"GeoLoRA r={r}", "geolora", {"r": r}) for r in starts]
    corrected = {"first_moment_correction": True}
    uncorrected = {"first_moment_correction": False}
    for name, moment in ((", M̂ corrected", corrected), (", M̂ uncorrected", uncorrected)):
        rows += [(f"GeoLoRA r={r}{name}", "geolora", {"r": r, **moment}) for r in starts]
    rows += [
        (f"GeoLoRA r={r}, global τ", "geolora", {"r": r, "truncation": "global"})
        for r in ((4,) if smoke else starts)
    ]
    named_rules = {name: f"riemannian_adam_{name}" for name in ("rows", "features")}
    named_rules[SCALAR_RULE] = SCALAR_RULE
    rows += [
        (f"GeoLoRA r={r}, {name}", "geolora", {"r": r, "base_rule": rule})
        for name, rule in named_rules.items()
        for r in ((4,) if smoke else starts)
    ]
    features_shrunk = {"base_rule": "riemannian_adam_features", "shrinkage": 0.05}
    rows += [
        (f"GeoLoRA r={r}, features, μ=0.05", "geolora", {"r": r, **features_shrunk})
        for r in ((4,) if smoke else starts)
    ]
    warm = {"lr_warmup": 2 if smoke else 30}
    scalar = (f", {SCALAR_RULE}", {"base_rule": SCALAR_RULE})
    for name, rule in (("", {}), (", features", {"base_rule": "riemannian_adam_features"}), scalar):
        rows += [
            (
                f"GeoLoRA r={r}{name}, warm-up {warm['lr_warmup']}",
                "geolora",
                {"r": r, **rule, **warm},
            )
            for r in ((4,) if smoke else starts)
        ]
    decay = {**warm, "lr_decay": True}  # the schedule of `geolora finetune`
    sched = f"warm-up {warm['lr_warmup']} + decay"
    first_moment = ((", M̂ corrected", corrected), (", M̂ uncorrected", uncorrected))
    for name, rule in (
        ("", {}),
        (", features", {"base_rule": "riemannian_adam_features"}),
        scalar,
        *first_moment,
    ):
        rows += [
            (f"GeoLoRA r={r}{name}, {sched}", "geolora", {"r": r, **rule, **decay})
            for r in ((4,) if smoke else starts)
        ]
    fixed = {"r": 16, "freeze_ranks_after": 0, "shrinkage": 0.0}
    rows.append(("GeoLoRA fixed r=16", "geolora", fixed))
    rows += [  # the first moment's effect under the schedule without any rank decision
        (f"GeoLoRA fixed r=16{name}, {sched}", "geolora", {**fixed, **rule, **decay})
        for name, rule in first_moment
    ]
    rows += _lr_sweep(warm, budget_params, smoke)
    rows += [
        (f"LoRA r={r}", "lora", {"r": r, "lora_alpha": 2.0 * r, "lr": LORA_LR})
        for r in ((4,) if smoke else (4, 8, 16))
    ]
    lora16 = {"r": 16, "lora_alpha": 32.0, "lr": LORA_LR, **warm}
    rows.append((f"LoRA r=16, warm-up {warm['lr_warmup']}", "lora", lora16))
    rows += [
        (f"LoRA r={r}, {sched}", "lora", {"r": r, "lora_alpha": 2.0 * r, "lr": LORA_LR, **decay})
        for r in ((4,) if smoke else (8, 16))
    ]
    adalora = {"init_r": 32, "target_r": target_r, "lora_alpha": 64.0, "lr": ADALORA_LR}
    rows.append((f"AdaLoRA 32→{target_r}", "adalora", adalora))
    rows.append((f"AdaLoRA 32→{target_r}, {sched}", "adalora", {**adalora, **decay}))
    nearly_fixed = {**adalora, "init_r": target_r + 1, "lora_alpha": 2.0 * (target_r + 1)}
    rows.append((f"AdaLoRA {target_r + 1}→{target_r}", "adalora", nearly_fixed))
    rows.append(
        ("LoRA r=32", "lora", {"r": 32, "lora_alpha": 64.0, "lr": LORA_LR, "truncate": True})
    )
    return rows


def _lr_sweep(
    warm: dict[str, Any], budget_params: int, smoke: bool
) -> list[tuple[str, str, dict[str, Any]]]:
    """GeoLoRA's lr on this task, under the warm-up (the first steps overshoot without one),
    with the features rule (the best fitter) three ways: its rank rule from r = 1 / 4 / 16, an
    exact budget of the planted parameters from r = 8 (``budget``, ``budget_unit="params"``) and
    a fixed rank 8 (LoRA r=8's size); beside the default rule from r = 4 and LoRA r = 8 under the
    same warm-up. lr 1e-3 is the optimizer's default (not passed)."""
    tag = f"warm-up {warm['lr_warmup']}"
    feat = {"base_rule": "riemannian_adam_features", **warm}
    per_param = {"budget_unit": "params"}
    ways = {
        "r={r}, features": [{"r": r, **feat} for r in ((4,) if smoke else (1, 4, 16))],
        "r=8, features, budget": [{"r": 8, **feat, "budget": budget_params, **per_param}],
        "fixed r=8, features": [{"r": 8, **feat, "freeze_ranks_after": 0, "shrinkage": 0.0}],
        "r=4": [{"r": 4, **warm}],
    }
    rows = []
    for lr in (2e-3,) if smoke else (1e-3, 2e-3, 3e-3):
        for way, hypers in ways.items():
            for h in hypers:
                name = f"GeoLoRA {way.format(r=h['r'])}, {tag}, lr {lr:g}"
                rows.append((name, "geolora", {**h, **({"lr": lr} if lr != 1e-3 else {})}))
        lora8 = {"r": 8, "lora_alpha": 16.0, "lr": lr, **warm}
        rows.append((f"LoRA r=8, {tag}, lr {lr:g}", "lora", lora8))
    return rows


def _found_ranks(prep: Prepared) -> dict[str, int]:
    if prep.method in ("geolora", "adalora"):
        return parameter_counts(prep)["ranks"]
    return {n: planted.numerical_rank(d, NUMERICAL_TAU) for n, d in delta_weights(prep).items()}


def _track_movement(prep: Prepared, pretrained: dict[str, torch.Tensor]) -> list[float]:
    """A list that gets, after every optimizer step, the mean over the adapted maps of
    ``‖ΔW_t − ΔW_{t−1}‖_F / ‖W‖_F`` (how far that step moved the weights)."""
    previous = {n: d.detach().clone() for n, d in delta_weights(prep).items()}
    movement: list[float] = []

    def record(*_: Any) -> None:
        with torch.no_grad():
            current = delta_weights(prep)
            moved = [float((d - previous[n]).norm() / pretrained[n]) for n, d in current.items()]
            previous.update({n: d.detach().clone() for n, d in current.items()})
        movement.append(sum(moved) / len(moved))

    prep.optimizer.register_step_post_hook(record)
    return movement


def fit(method: str, hyper: dict[str, Any], setup: planted.PlantedSetup, out) -> dict[str, Any]:
    """Train one student (cached by :func:`common.cached`)."""

    def compute() -> dict[str, Any]:
        torch.set_num_threads(minilm.THREADS)
        d = planted.data(setup)
        seed = hyper.get("seed", 0)
        torch.manual_seed(seed)
        extras = ("truncate", "track_movement", "second_moment", "seed", *common.SCHEDULE_OPTIONS)
        fit_hyper = {k: v for k, v in hyper.items() if k not in extras}
        prep = prepare(method, fit_hyper, planted.student(), setup.steps, heads=[])
        if hyper.get("second_moment"):  # LoRA with another Adam granularity (factor_adam.py)
            prep.optimizer = factor_adam.for_lora(prep.model, hyper["second_moment"], hyper["lr"])
        common.schedule_lr_as_asked(prep.optimizer, hyper, setup.steps)
        pretrained = {
            n: m.weight.detach().norm()
            for n, m in planted.adapted_modules(planted.student()).items()
        }
        movement = _track_movement(prep, pretrained) if hyper.get("track_movement") else None
        prep.reported_loss = planted.regression_loss
        prep.model.eval()  # no dropout: a clean regression
        trained = common.train(prep, d["train"], setup.steps, setup.batch_size, seed=seed)
        counts = parameter_counts(prep)
        result = {
            **({"step_movement": movement} if movement is not None else {}),
            "relative_delta_norm": {
                n: float(delta.norm() / pretrained[n]) for n, delta in delta_weights(prep).items()
            },
            **trained,
            "lr": prep.optimizer.param_groups[0].get(
                "initial_lr", prep.optimizer.param_groups[0]["lr"]
            ),
            "relative_loss": planted.relative_loss(prep.model, setup),
            "ranks": _found_ranks(prep),
            "adapter_params": counts.get("adapter_params", counts["trainable_params"]),
            "trainable_params": counts["trainable_params"],
        }
        if hyper.get("truncate"):
            plan = d["planted"]
            budget = sum(plan.values())
            result["truncated"] = lora_truncation.truncations(prep, budget, len(plan), setup)
        return result

    return common.cached(method, hyper, setup, out, compute)


SHORT = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "intermediate.dense": "ffn1",
    "output.dense": "ffn2",
}


def short_name(module: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` → ``3.q``."""
    layer, _, rest = module.removeprefix("bert.encoder.layer.").partition(".")
    return f"{layer}.{SHORT[rest]}"


def summarize(label: str, res: dict[str, Any], planted_ranks: dict[str, int]) -> dict[str, Any]:
    """One table row: loss, size, and how many modules' ranks were recovered."""
    found = res["ranks"]
    by_rank = {
        k: [found[n] for n, p in planted_ranks.items() if p == k] for k in planted.PLANTED_RANKS
    }
    hits = [planted.recovered(found[n], p) for n, p in planted_ranks.items()]
    return {
        "label": label,
        "relative_loss": res["relative_loss"],
        "adapter_params": res["adapter_params"],
        "total_rank": sum(found.values()),
        "recovered": sum(hits),
        "mean_found": {k: sum(v) / len(v) for k, v in by_rank.items()},
        "recovered_by_rank": {
            k: sum(planted.recovered(f, k) for f in v) for k, v in by_rank.items()
        },
        "ranks": found,
        "lr": res.get("lr"),
        "train_s": res.get("train_s"),
    }


def seed_means(rows: list[dict[str, Any]], n_modules: int) -> list[str]:
    """A table of each run's mean ± std (n−1) over its seeds: loss, size, recovered modules."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        runs.setdefault(row["run"], []).append(row)

    def mean_std(values: list[float], spec: str) -> str:
        t = torch.tensor(values, dtype=torch.float64)
        std = float(t.std()) if len(values) > 1 else 0.0
        return f"{float(t.mean()):{spec}} ± {std:{spec}}"

    lines = [
        "Mean ± std over the seeds (n−1):",
        "",
        "| method | seeds | adapter params | total rank | rel. loss | recovered (of "
        f"{n_modules}) |",
        "|---|---|---|---|---|---|",
    ]
    for run, group in runs.items():
        cells = [
            mean_std([r[key] for r in group], spec)
            for key, spec in (
                ("adapter_params", ",.0f"),
                ("total_rank", ".0f"),
                ("relative_loss", ".4f"),
                ("recovered", ".1f"),
            )
        ]
        lines.append(f"| {run} | {len(group)} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def options(parser) -> None:
        parser.add_argument("--steps", type=int, default=None, help="training steps per run")
        parser.add_argument("--only", nargs="+", default=None, help="run only these labels")
        parser.add_argument(
            "--seeds", nargs="+", type=int, default=[0], help="each run once per training seed"
        )

    args = common.parse_args(
        __doc__.splitlines()[0], argv, methods=("geolora", "lora", "adalora"), add_options=options
    )
    setup = planted.SMOKE if args.smoke else planted.PlantedSetup()
    if args.steps is not None:
        setup = dataclasses.replace(setup, steps=args.steps)
    d = planted.data(setup)
    plan = d["planted"]
    budget = sum(plan.values())
    budget_params = planted.planted_params(plan)
    rows = []
    for label, method, hyper in specs(budget, len(plan), budget_params, args.smoke):
        if method not in args.methods or (args.only and label not in args.only):
            continue
        for seed in args.seeds:
            tag = f", seed {seed}" if len(args.seeds) > 1 else ""
            print(f"{label}{tag} ...", flush=True)
            res = fit(method, {**hyper, **({"seed": seed} if seed else {})}, setup, args.out)
            rows.append({**summarize(label + tag, res, plan), "run": label, "seed": seed})
            for kind, trunc in res.get("truncated", {}).items():
                name = f"{label} → SVD, {kind}"
                row = summarize(f"{name} (rank arg {trunc['rank_argument']:.4g}){tag}", trunc, plan)
                rows.append({**row, "lr": res["lr"], "run": name, "seed": seed})
    n = len(plan)
    t = d["teacher"]
    lines = [
        f"Teacher: all-MiniLM-L6-v2 with planted ranks {'/'.join(map(str, planted.PLANTED_RANKS))} "
        f"on its {n} linear maps ({n // len(planted.PLANTED_RANKS)} each, seeded), "
        f"‖ΔW‖_F = {setup.relative_norm:g}·‖W‖_F per planted map, equal singular values; planted "
        f"total rank {budget} ({budget_params:,} params as r(n+m)). It moves the last hidden "
        f"states by {100 * t['relative_output_change']:.1f} % (relative norm) and leaves a mean "
        f"cosine {t['pooled_cosine']:.3f} between pooled embeddings of teacher and pretrained "
        "model.",
        "",
        f"Student: pretrained model + adapters on the same maps, masked MSE on last hidden states, "
        f"{setup.n_train} train / {setup.n_eval} held-out Rotten Tomatoes sentences, max_length "
        f"{setup.max_length}, batch {setup.batch_size}, {setup.steps} steps, constant lr "
        "(rows with a warm-up: rising linearly over its steps; with a decay: then falling "
        "linearly to 0 at the last step, the schedule of `geolora finetune`; lr = the peak), "
        f"training seed {' / '.join(map(str, args.seeds))} (batch order and initialisation; the "
        f"teacher's seed is fixed), {minilm.THREADS} CPU thread. "
        "Loss = held-out MSE / MSE of the pretrained model. "
        f"LoRA ranks found = numerical rank of ΔW at τ={NUMERICAL_TAU} (see the script).",
        "",
        "| method | lr | adapter params | total rank | rel. loss | recovered (of "
        f"{n}) | mean rank found at planted {' / '.join(map(str, planted.PLANTED_RANKS))} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        means = " / ".join(f"{r['mean_found'][k]:.1f}" for k in planted.PLANTED_RANKS)
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['adapter_params']:,} | {r['total_rank']} | "
            f"{r['relative_loss']:.4f} | {r['recovered']} | {means} |"
        )
    if len(args.seeds) > 1:
        lines += ["", *seed_means(rows, n)]
    lines += [
        "",
        "Rank found per module (layer.map; ffn1 = intermediate, ffn2 = output):",
        "",
        "| module | planted | " + " | ".join(r["label"] for r in rows) + " |",
        "|---|---|" + "---|" * len(rows),
    ]
    for module, k in plan.items():
        cells = " | ".join(str(r["ranks"][module]) for r in rows)
        lines.append(f"| {short_name(module)} | {k} | {cells} |")
    payload = {
        "setup": dataclasses.asdict(setup),
        "planted": plan,
        "planted_total_rank": budget,
        "planted_params": budget_params,
        "teacher": t,
        "rows": rows,
    }
    common.publish(NAME, "Planted ranks", lines, payload, args)
    return payload


if __name__ == "__main__":
    main()
