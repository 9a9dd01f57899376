"""τ × lr: how GeoLoRA's final ranks and accuracy depend on the truncation tolerance and the
learning rate (spec §2: a relative tolerance can stall rank growth at small learning rates).
One seed; r = 8 → r_max 32. The recommended default is the cell with the best validation
accuracy; ties within 0.5 points go to the smaller adapter.
"""

from __future__ import annotations

from typing import Any

import common

NAME = "tau_lr"
TAUS = (0.05, 0.1, 0.2)
LRS = (3e-4, 1e-3, 3e-3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    s, out = args.setup, args.out
    taus, lrs = ((0.1,), (1e-3,)) if args.smoke else (TAUS, LRS)
    grid = {
        (t, lr): common.run("geolora", {"tau": t, "lr": lr}, s, out) for t in taus for lr in lrs
    }
    lines = [
        common.setup_note(s),
        "",
        "Cells: final total rank / adapter parameters / test accuracy (%) [validation accuracy].",
        "",
        "| τ \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
        "|---" * (len(lrs) + 1) + "|",
    ]
    for t in taus:
        cells = []
        for lr in lrs:
            r = grid[(t, lr)]
            cells.append(
                f"{r['total_rank']} / {r['adapter_params']:,} / "
                f"{100 * r['test_acc']:.1f} [{100 * r['val_acc']:.1f}]"
                + (" diverged" if r["diverged"] else "")
            )
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    top = max(r["val_acc"] for r in grid.values())
    near = [k for k, r in grid.items() if r["val_acc"] >= top - 0.005]
    best = min(near, key=lambda k: grid[k]["adapter_params"])
    lines += [
        "",
        f"Best validation accuracy {100 * top:.1f}%; within 0.5 points of it the "
        f"smallest adapter is τ={best[0]:g}, lr={best[1]:g} "
        f"({grid[best]['adapter_params']:,} adapter params).",
    ]
    payload = {
        "taus": list(taus),
        "lrs": list(lrs),
        "recommended": {"tau": best[0], "lr": best[1]},
        "cells": [
            {
                "tau": t,
                "lr": lr,
                **{
                    k: r[k]
                    for k in (
                        "key",
                        "total_rank",
                        "adapter_params",
                        "test_acc",
                        "val_acc",
                        "diverged",
                    )
                },
            }
            for (t, lr), r in grid.items()
        ],
    }
    common.publish(NAME, "τ × learning rate", lines, payload, args)
    return payload


if __name__ == "__main__":
    main()
