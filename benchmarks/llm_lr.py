"""Learning rates on the causal-LM task of ``llm_sft.py``: GeoLoRA at 1e-4 … 1e-2 and GeoLoRA
with ``base_rule="riemannian_adam_rows"`` at 3e-4 … 3e-3 (and at 3e-4, 1e-3 with a budget of
LoRA r=8's parameter count) against peft LoRA r=8 at 3e-4 … 3e-3, side by side on the same
batches (one seed per call). ``--sweep features`` runs the other set of :data:`SWEEPS`:
``base_rule="riemannian_adam_features"`` at 3e-4 … 3e-3 (and with the budget at 3e-4, 1e-3)
beside the best rows run and LoRA run of the first set, on the same batches.

``llm_sft.py`` runs every method at one untuned lr, and GeoLoRA's accuracy there depends on
the seed. This sweep asks whether another lr or the row-capped base rule fixes that; its
table shows each run's early loss peak (the largest loss of the first ten steps: GeoLoRA's
first steps overshoot) and its mean loss over the last ten. The
held-out answers are the only split, so the best lr per method here is picked on them: read the
best row as an upper bound, the whole column as the lr sensitivity.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import common
import llm_sft
import torch

NAME = "llm_lr"
RUNS = {
    "GeoLoRA, lr 1e-4": ("geolora", 1e-4),
    "GeoLoRA, lr 3e-4": ("geolora", 3e-4),
    "GeoLoRA, lr 1e-3": ("geolora", 1e-3),
    "GeoLoRA, lr 3e-3": ("geolora", 3e-3),
    "GeoLoRA, lr 1e-2": ("geolora", 1e-2),
    "GeoLoRA rows, lr 3e-4": ("geolora-rows", 3e-4),
    "GeoLoRA rows, lr 1e-3": ("geolora-rows", 1e-3),
    "GeoLoRA rows, lr 3e-3": ("geolora-rows", 3e-3),
    "GeoLoRA rows, budget = LoRA's params, lr 3e-4": ("geolora-rows-budget", 3e-4),
    "GeoLoRA rows, budget = LoRA's params, lr 1e-3": ("geolora-rows-budget", 1e-3),
    "LoRA r=8, lr 3e-4": ("lora", 3e-4),
    "LoRA r=8, lr 1e-3": ("lora", 1e-3),
    "LoRA r=8, lr 3e-3": ("lora", 3e-3),
}
FEATURE_RUNS = {
    "GeoLoRA features, lr 3e-4": ("geolora-features", 3e-4),
    "GeoLoRA features, lr 1e-3": ("geolora-features", 1e-3),
    "GeoLoRA features, lr 3e-3": ("geolora-features", 3e-3),
    "GeoLoRA features, budget = LoRA's params, lr 3e-4": ("geolora-features-budget", 3e-4),
    "GeoLoRA features, budget = LoRA's params, lr 1e-3": ("geolora-features-budget", 1e-3),
    "GeoLoRA rows, lr 3e-4": ("geolora-rows", 3e-4),
    "LoRA r=8, lr 3e-4": ("lora", 3e-4),
}
SWEEPS = {"rules": (RUNS, "two base rules"), "features": (FEATURE_RUNS, "riemannian_adam_features")}
"""The run sets ``--sweep`` chooses from (runs, what the title says they compare); the first is
the default."""


def parse_args(argv: list[str] | None):
    """``llm_sft``'s options plus ``--sweep`` (one of :data:`SWEEPS`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--sweep", choices=tuple(SWEEPS), default=next(iter(SWEEPS)))
    known, rest = parser.parse_known_args(argv)
    args = llm_sft.parse_args(rest)
    args.sweep = known.sweep
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    task, zero_shot = llm_sft.prepare_task(args)
    runs, compared = SWEEPS[args.sweep]
    runs = dict(list(runs.items())[::2]) if args.smoke else runs
    results, _ = llm_sft.train_side_by_side(*task, args, runs=runs)
    lines = [
        f"{args.model}, the task of `llm_sft.py` ({len(task[1])} training examples, one pass of "
        f"{args.steps} steps of {args.batch_size}, warm-up 10 % then linear decay, clipping at "
        f"1), {len(task[3])} held out, seed {args.seed}; zero-shot accuracy "
        f"{zero_shot['accuracy']:.3f}. Loss = training loss on the answer tokens.",
        "",
        "| run | accuracy | exact match | final trainable params | total rank | first loss | "
        f"peak of the first {llm_sft.EARLY_STEPS} | mean of the last {llm_sft.EARLY_STEPS} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['accuracy']:.3f} | {r['exact_match']:.3f} | "
            f"{r['trainable_params']:,} | {r['total_rank']} | "
            f"{r['first_loss']:.3f} | {r['peak_early_loss']:.3f} | {r['mean_late_loss']:.3f} |"
        )
    payload = {"zero_shot": zero_shot, "runs": {k: list(v) for k, v in runs.items()},
               "results": results}  # fmt: skip
    title = f"Causal-LM learning rates: GeoLoRA ({compared}) vs LoRA"
    cmd = llm_sft.command(NAME, args)
    if args.sweep != next(iter(SWEEPS)):
        cmd += f" --sweep {args.sweep}"
    common.write_table(NAME, cmd, title, lines, payload, args.out)
    print("\n".join(lines), file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
