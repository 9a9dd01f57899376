"""Base rule (spec §4): GeoLoRA's factor directions from ``adam`` against ``sgd`` (plain, the
paper's form, and with heavy-ball momentum 0.9), each with its own lr sweep, one seed.
The classifier head is trained by AdamW at the adam sweep's best lr in every run, so only the
rule for the factors changes.
"""

from __future__ import annotations

import math
from typing import Any

import common

NAME = "base_rule"
SGD_GRIDS = {0.0: (3e-2, 1e-1, 3e-1, 1.0), 0.9: (3e-3, 1e-2, 3e-2, 1e-1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    s, out = args.setup, args.out
    adam_lr, adam_runs = common.best_lr(
        "geolora", {"base_rule": "adam"}, (1e-3,) if args.smoke else common.LR_GRID, s, out
    )
    rules = {"adam": (adam_lr, adam_runs)}
    for momentum, grid in SGD_GRIDS.items():
        grid = grid[:1] if args.smoke else grid
        hyper = {"base_rule": "sgd", "momentum": momentum, "other_lr": adam_lr}
        rules[f"sgd (momentum {momentum:g})"] = common.best_lr("geolora", hyper, grid, s, out)
    lines = [
        common.setup_note(s),
        "",
        "Per rule: every lr of its sweep as test acc (%) "
        "[val acc], final total rank; the best lr (by val accuracy) in bold.",
        "",
        "| rule | sweep | best lr | test acc at best (%) | total rank at best |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for rule, (best, runs) in rules.items():
        cells = []
        for r in runs:
            lr = r["config"]["hyper"]["lr"]
            cell = (
                f"{lr:g}: {100 * r['test_acc']:.1f} [{100 * r['val_acc']:.1f}] "
                f"r={r['total_rank']}" + (" NaN" if r["diverged"] else "")
            )
            cells.append(f"**{cell}**" if lr == best else cell)
        win = next(r for r in runs if r["config"]["hyper"]["lr"] == best)
        summary[rule] = {
            "lr": best,
            "test_acc": win["test_acc"],
            "val_acc": win["val_acc"],
            "total_rank": win["total_rank"],
        }
        lines.append(
            f"| {rule} | {'; '.join(cells)} | {best:g} | {100 * win['test_acc']:.1f} | "
            f"{win['total_rank']} |"
        )
    ranked = sorted(summary, key=lambda k: summary[k]["val_acc"], reverse=True)
    winner, gap = ranked[0], summary[ranked[0]]["val_acc"] - summary[ranked[1]]["val_acc"]
    p = summary[winner]["val_acc"]
    stderr = math.sqrt(p * (1 - p) / s.n_val)
    tie = gap < stderr
    lines += [
        "",
        f"Best validation accuracy: **{winner}**, {100 * gap:.1f} points ahead of {ranked[1]} "
        f"(one standard error of a {s.n_val}-sentence accuracy is {100 * stderr:.1f} points"
        + (": a tie within noise" if tie else "")
        + "). Test accuracy at the best lr: "
        + ", ".join(f"{k} {100 * v['test_acc']:.1f}%" for k, v in summary.items())
        + ".",
    ]
    payload = {"summary": summary, "winner": winner, "val_gap": gap, "tie_within_noise": tie}
    common.publish(NAME, "Base rule: adam vs sgd", lines, payload, args)
    return payload


if __name__ == "__main__":
    main()
