"""Run the whole text benchmark suite (``make bench``) and record how long each script took.

Scripts run in one process, in an order that lets later tables reuse earlier runs from the cache
(``results/runs``): the lr sweeps of ``lr_robustness`` feed every other table. Timing scripts
run last. ``--smoke`` runs every script for a few steps (CI).
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import common

SCRIPTS = (
    "lr_robustness",
    "accuracy_budget",
    "tau_lr",
    "init_rank",
    "base_rule",
    "base_rule_choice",
    "planted_ranks",
    "planted_steps",
    "planted_normalisers",
    "planted_reference_rank",
    "planted_gradients",
    "step_alignment",
    "text_comparison",
    "lr_sweep",
    "step_overhead",
    "cost_scaling",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    extra = ["--smoke"] if args.smoke else []
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for name in SCRIPTS:
        t = time.perf_counter()
        importlib.import_module(name).main([*extra, "--out", str(args.out)])
        seconds[name] = time.perf_counter() - t
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    total = time.perf_counter() - start
    lines = [
        "Wall-clock seconds per script (runs already in `results/runs` are not repeated, "
        "so a rerun takes seconds).",
        "",
        "| script | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in seconds.items()],
        f"| **total** | {total:.0f} |",
    ]
    payload = {"seconds": seconds, "total_s": total}
    common.publish("run_all", "Benchmark suite timing", lines, payload, args)
    return payload


if __name__ == "__main__":
    main()
