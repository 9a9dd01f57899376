"""Real-task comparison (issue 9): GeoLoRA (library defaults) against peft LoRA r=8 and peft
AdaLoRA 12→8 on Rotten Tomatoes with all six encoder layers adapted, 500 steps.

Each method's lr comes from its own sweep at seed 0 (picked on validation accuracy; AdaLoRA's
grid sits 2.5–5× higher than LoRA's, as it needs); the chosen lr is then run with seeds 1 and 2.
The table reports test accuracy as mean ± std over the 3 seeds and the trainable parameters at
the end (GeoLoRA's at its final ranks, AdaLoRA's unmasked triplets), classifier included.
``head`` (the classifier alone) shows how much of the accuracy the encoder adaptation adds.

Targets (issue 9): GeoLoRA ≥ LoRA r=8 + 0.5 pt and ≥ AdaLoRA, at ≤ LoRA r=8's final parameters.

Every run has a constant lr; ``--warmup N`` and ``--decay`` give every method the same schedule
instead (``--warmup 50 --decay`` is ``geolora finetune``'s default: a 10 % warm-up, then a linear
decay to 0; :func:`common.schedule_lr_as_asked`).
"""

from __future__ import annotations

import statistics
from typing import Any

import common
import minilm
from methods import geolora_defaults

NAME = "text_comparison"
GRIDS = {
    "geolora": (3e-4, 1e-3, 3e-3),
    "lora": (3e-4, 1e-3, 3e-3),
    "adalora": (1e-3, 3e-3, 1e-2),
    "head": (1e-2,),
}
LABELS = {"geolora": "GeoLoRA (defaults)", "lora": "LoRA r=8", "adalora": "AdaLoRA 12→8"}
SEEDS = (0, 1, 2)


def hyper_of(method: str) -> dict[str, Any]:
    """GeoLoRA names its default initial rank, so its runs share the cache with init_rank's."""
    return {"r": geolora_defaults()["r"]} if method == "geolora" else {}


def compare(
    method: str, setup: minilm.Setup, out, smoke: bool, schedule: dict[str, Any]
) -> dict[str, Any]:
    """The lr sweep at seed 0, then the best lr at every seed, all under the lr ``schedule``
    (run options of :func:`common.schedule_lr_as_asked`)."""
    grid = GRIDS[method][:1] if smoke else GRIDS[method]
    if method == "geolora" and not smoke:
        grid = tuple(sorted({*grid, geolora_defaults()["lr"]}))
    hyper = {**hyper_of(method), **schedule}
    lr, sweep = common.best_lr(method, hyper, grid, setup, out)
    seeds = SEEDS[:2] if smoke else SEEDS
    runs = [common.run(method, {**hyper, "lr": lr, "seed": s}, setup, out) for s in seeds]
    return {"lr": lr, "sweep": sweep, "runs": runs}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv, methods=tuple(GRIDS), schedule=True)
    setup = minilm.REAL_TASK_SMOKE if args.smoke else minilm.REAL_TASK
    results = {}
    for method in args.methods:
        print(f"{method} ...", flush=True)
        results[method] = compare(method, setup, args.out, args.smoke, args.schedule)
    majority = float(minilm.features(setup)["test"]["labels"].float().mean())
    majority = max(majority, 1 - majority)
    lines = [
        common.setup_note(setup, args.schedule),
        "",
        f"Always answering the majority class scores {100 * majority:.1f} % on the test set. "
        "GeoLoRA runs with the library's defaults (initial rank, r_max, τ, scale, base rule); "
        "LoRA r=8 and AdaLoRA (init_r 12 → target_r 8, tinit 10 % / tfinal 20 % of the steps) "
        "with lora_alpha 16 and AdamW.",
        "",
        "| method | lr (sweep: val acc %) | test acc (%), seeds | final trainable params "
        "| final total rank |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for method, res in results.items():
        runs = res["runs"]
        sweep = ", ".join(
            f"{r['config']['hyper']['lr']:g}: {100 * r['val_acc']:.1f}" for r in res["sweep"]
        )
        params = _mean([r["trainable_params"] for r in runs])
        ranks = [r["total_rank"] for r in runs if "total_rank" in r]
        accs = [r["test_acc"] for r in runs]
        summary[method] = {
            "lr": res["lr"],
            "test_accs": accs,
            "mean_acc": _mean(accs),
            "std_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "params": params,
            "total_rank": _mean(ranks) if ranks else None,
        }
        lines.append(
            f"| {LABELS.get(method, method)} | **{res['lr']:g}** ({sweep}) | "
            f"{common.fmt_acc(accs)} ({len(accs)}) | {params:,.0f} | "
            f"{f'{_mean(ranks):.0f}' if ranks else ''} |"
        )
    lines += ["", *verdicts(summary)]
    payload = {"majority": majority, "summary": summary}
    common.publish(NAME, "Real-task comparison", lines, payload, args)
    return payload


def verdicts(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Issue 9's accuracy targets, where the needed methods ran; a gap smaller than the larger
    seed std of the two methods is marked as within noise."""
    geo, lora, ada = (summary.get(m) for m in ("geolora", "lora", "adalora"))
    if geo is None or lora is None:
        return []

    def gap(other: dict[str, Any]) -> tuple[float, str]:
        points = 100 * (geo["mean_acc"] - other["mean_acc"])
        noise = 100 * max(geo["std_acc"], other["std_acc"])
        return points, " (within seed noise)" if abs(points) < noise else ""

    small = geo["params"] <= lora["params"]
    points, noise = gap(lora)
    out = [
        f"- GeoLoRA − LoRA r=8: {points:+.2f} pt{noise} at "
        f"{geo['params'] / lora['params']:.2f}× its parameters (target ≥ +0.5 pt at ≤ 1×: "
        f"{'met' if points >= 0.5 and small else 'missed'})."
    ]
    if ada is not None:
        points, noise = gap(ada)
        out.append(
            f"- GeoLoRA − AdaLoRA: {points:+.2f} pt{noise} (target ≥ 0 at ≤ LoRA r=8's "
            f"parameters: {'met' if points >= 0 and small else 'missed'})."
        )
    return out


if __name__ == "__main__":
    main()
