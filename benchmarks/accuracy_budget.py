"""Accuracy at budget: GeoLoRA (τ ∈ {0.05, 0.1, 0.2} and the global parameter budget) against
LoRA (r = 2, 4, 8, 16), AdaLoRA (target rank matched to GeoLoRA τ=0.1's final adapter
parameters), full fine-tuning and a head-only baseline; mean ± std over seeds, trainable
parameters at the end, and a plot of accuracy against trainable parameters.

Learning rates: one sweep per family at seed 0, picked on validation accuracy (GeoLoRA at τ=0.1,
LoRA at r=8, AdaLoRA at 12→8, from the grid of ``lr_robustness``); the other members of a family
reuse it. The GeoLoRA budget run keeps as many adapter parameters as LoRA r=4 has
(``budget_unit="params"``, ``r·(n+m+1)`` per layer). AdaLoRA: ``target_r`` is the average rank
that gives GeoLoRA τ=0.1's adapter parameters (seed 0), ``init_r = ⌈1.5·target_r⌉`` (peft's
default ratio 12/8), ``tinit`` = 10% and ``tfinal`` = 20% of the steps.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import common
import methods
import minilm

NAME = "accuracy_budget"
SEEDS = (0, 1, 2)


def _adapter_shapes(setup: minilm.Setup) -> list[tuple[int, int]]:
    """(out, in) of the adapted maps of one MiniLM layer, times ``top_layers``."""
    h, f = 384, 1536
    return [(h, h)] * 4 * setup.top_layers + [(f, h), (h, f)] * setup.top_layers


def _configs(setup: minilm.Setup, lrs: dict[str, float], geo_params: int) -> list[tuple]:
    shapes = _adapter_shapes(setup)
    per_rank = sum(n + m + 1 for n, m in shapes)
    lora4 = sum(4 * (n + m) for n, m in shapes)
    target_r = max(1, round(geo_params / per_rank))
    geo, lora = lrs["geolora"], lrs["lora"]
    return [
        *[("geolora", f"τ={t}", {"tau": t, "lr": geo}) for t in (0.05, 0.1, 0.2)],
        (
            "geolora",
            f"budget={lora4} params",
            {"budget": lora4, "budget_unit": "params", "lr": geo},
        ),
        *[("lora", f"r={r}", {"r": r, "lr": lora}) for r in (2, 4, 8, 16)],
        (
            "adalora",
            f"{math.ceil(1.5 * target_r)}→{target_r}",
            {"init_r": math.ceil(1.5 * target_r), "target_r": target_r, "lr": lrs["adalora"]},
        ),
        ("full", "top layer + head", {"lr": lrs["full"]}),
        ("head", "classifier", {"lr": lrs["head"]}),
    ]


def _plot(rows: list[dict[str, Any]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods.METHODS:
        pts = [r for r in rows if r["method"] == method]
        if pts:
            ax.errorbar(
                [r["params"] for r in pts],
                [100 * r["mean"] for r in pts],
                yerr=[100 * r["std"] for r in pts],
                fmt="o",
                capsize=3,
                label=method,
            )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters at the end")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    s, out = args.setup, args.out
    lr_grid = (1e-3,) if args.smoke else common.LR_GRID
    lrs = {m: common.best_lr(m, {}, lr_grid, s, out)[0] for m in ("geolora", "lora", "adalora")}
    lrs["full"] = common.best_lr(
        "full", {}, (1e-4,) if args.smoke else common.FULL_LR_GRID, s, out
    )[0]
    lrs["head"] = common.best_lr(
        "head", {}, (1e-3,) if args.smoke else common.HEAD_LR_GRID, s, out
    )[0]
    geo_params = common.run("geolora", {"lr": lrs["geolora"]}, s, out)["adapter_params"]
    seeds = SEEDS[:1] if args.smoke else SEEDS
    rows = []
    for method, label, hyper in _configs(s, lrs, geo_params):
        runs = [common.run(method, {**hyper, "seed": seed}, s, out) for seed in seeds]
        accs = [r["test_acc"] for r in runs]
        rows.append(
            {
                "method": method,
                "label": label,
                "lr": hyper["lr"],
                "accs": accs,
                "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "params": statistics.fmean(r["trainable_params"] for r in runs),
                "allocated": statistics.fmean(
                    r.get("allocated_params", r["trainable_params"]) for r in runs
                ),
                "total_rank": [r.get("total_rank") for r in runs],
                "diverged": sum(r["diverged"] for r in runs),
                "keys": [r["key"] for r in runs],
            }
        )
    lines = [
        common.setup_note(s),
        "",
        f"Seeds: {list(seeds)}. Trainable parameters include the "
        "classifier (770); AdaLoRA: effective (unmasked triplets) / allocated.",
        "",
        "| method | config | lr | trainable params | total rank (per seed) | test acc (%) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = f"{r['params']:,.0f}"
        if r["method"] == "adalora":
            params += f" / {r['allocated']:,.0f}"
        ranks = ", ".join(str(x) for x in r["total_rank"]) if r["total_rank"][0] else "–"
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(
            f"| {r['method']} | {r['label']} | {r['lr']:g} | {params} | {ranks} | "
            f"{common.fmt_acc(r['accs'])}{div} |"
        )
    lora8 = next(r for r in rows if r["method"] == "lora" and r["label"] == "r=8")
    ada = next(r for r in rows if r["method"] == "adalora")
    targets = {}
    for r in rows:
        if r["method"] == "geolora":
            targets[r["label"]] = {
                "vs_lora8": r["mean"] >= lora8["mean"] and r["params"] < lora8["params"],
                "vs_adalora": r["mean"] > ada["mean"],
            }
    lines += ["", "Targets (mean test accuracy; parameters at the end):", ""]
    for label, t in targets.items():
        lines.append(
            f"- GeoLoRA {label}: ≥ LoRA r=8 ({100 * lora8['mean']:.1f}%) with fewer "
            f"parameters ({lora8['params']:,.0f}): **{'met' if t['vs_lora8'] else 'missed'}**"
            f"; above AdaLoRA ({100 * ada['mean']:.1f}% at {ada['params']:,.0f}): "
            f"**{'met' if t['vs_adalora'] else 'missed'}**"
        )
    lines += ["", f"![accuracy vs parameters]({NAME}.png)"]
    _plot(rows, out / f"{NAME}.png")
    payload = {"seeds": list(seeds), "lrs": lrs, "rows": rows, "targets": targets}
    common.publish(NAME, "Accuracy at budget", lines, payload, args)
    return payload


if __name__ == "__main__":
    main()
