"""Where the step time goes on the causal LM of ``llm_sft.py``: forward, backward, gradient
clipping, ``optimizer.step()`` and ``zero_grad`` of GeoLoRA (the library's defaults) against peft
LoRA r=8, and of GeoLoRA with the optimizer's adapters stepped in one zero-padded bucket per shape
(``geolora.optim.buckets.BUCKET_OVERHEAD = inf``, the grouping before :mod:`geolora.optim.buckets`).

The three train side by side in one process on the same batches (llm_sft's task, length-bucketed,
warm-up then linear decay, clipping at 1), one step of each in turn, so that every phase sees the
same machine load; each phase is the median over the steps after the first, and the ratio to LoRA
is the median of the per-step ratios of whole steps. The two GeoLoRA runs take the same step to
rounding (their total ranks are listed), so the difference between them is the bucketing's.
``--smoke`` runs the same code on a tiny model for CI.
"""

from __future__ import annotations

import math
import statistics
import sys
from typing import Any

import common
import llm_methods
import llm_sft
import torch

import geolora.optim.buckets
from geolora.app.batches import epoch_batches
from geolora.app.causal_lm import encode_chats, sentiment_instructions
from geolora.app.finetune import learning_rate_at
from geolora.app.models import load_causal_lm, resolve_model

NAME = "llm_step_time"
PHASES = ("forward", "backward", "clip", "optimizer", "zero_grad")
RUNS = {
    "LoRA r=8": ("lora", None),
    "GeoLoRA": ("geolora", None),
    "GeoLoRA, one padded bucket per shape": ("geolora", math.inf),
}
"""label → (method, the bucket overhead its optimizer steps with; None: the library's)."""


def timed_step(trainer: llm_methods.MethodTrainer, batch: dict, lr: float) -> dict[str, float]:
    """One :meth:`MethodTrainer.step` of ``trainer``, seconds per phase."""
    marks: list[float] = []
    trainer.step(batch, lr, marks)
    return dict(zip(PHASES, (b - a for a, b in zip(marks, marks[1:]))))


def measure(args: Any) -> dict[str, Any]:
    model_dir = resolve_model(args.model)
    chats, _ = sentiment_instructions(0.0, args.seed, args.steps * args.batch_size)
    _, tokenizer = load_causal_lm(model_dir)
    train = encode_chats(tokenizer, chats, 256)
    batches = epoch_batches(train.lengths(), args.batch_size, args.seed, 0)[: args.steps]
    trainers = {
        label: llm_methods.build(method, model_dir, args.steps, seed=args.seed)
        for label, (method, _) in RUNS.items()
    }
    times: dict[str, list[dict[str, float]]] = {label: [] for label in RUNS}
    default_overhead = geolora.optim.buckets.BUCKET_OVERHEAD
    try:
        for step, ids in enumerate(batches):
            batch = train.batch(ids)
            for label, trainer in trainers.items():
                method, overhead = RUNS[label]
                peak = llm_methods.LEARNING_RATES[method]
                lr = learning_rate_at(step, args.steps, peak, max(1, args.steps // 10))
                chosen = default_overhead if overhead is None else overhead
                geolora.optim.buckets.BUCKET_OVERHEAD = chosen
                times[label].append(timed_step(trainer, batch, lr))
            print(f"step {step + 1}/{args.steps}", file=sys.stderr, flush=True)
    finally:
        geolora.optim.buckets.BUCKET_OVERHEAD = default_overhead
    lora = [sum(t.values()) for t in times["LoRA r=8"]]
    results = {}
    for label, trainer in trainers.items():
        kept = times[label][1:] or times[label]
        totals = [sum(t.values()) for t in times[label]]
        ratios = [a / b for a, b in zip(totals, lora)][1:] or [1.0]
        results[label] = {
            "phase_s": {p: statistics.median(t[p] for t in kept) for p in PHASES},
            "step_s": statistics.median(sum(t.values()) for t in kept),
            "ratio_to_lora": statistics.median(ratios),
            "total_rank": sum(trainer.ranks().values()),
        }
    return results


def table(results: dict[str, Any], args: Any) -> list[str]:
    lines = [
        f"{args.model}, the task of `llm_sft.py` ({args.steps} steps of {args.batch_size}, seed "
        f"{args.seed}, {torch.get_num_threads()} thread(s)); milliseconds, median over the steps "
        "after the first; ratio = median per-step ratio of whole steps to LoRA's.",
        "",
        "| run | " + " | ".join(PHASES) + " | step | × LoRA | total rank |",
        "|---|" + "---|" * (len(PHASES) + 3),
    ]
    for label, r in results.items():
        phases = " | ".join(f"{1000 * r['phase_s'][p]:.1f}" for p in PHASES)
        lines.append(
            f"| {label} | {phases} | {1000 * r['step_s']:.0f} | {r['ratio_to_lora']:.3f} | "
            f"{r['total_rank']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = llm_sft.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    results = measure(args)
    lines = table(results, args)
    title = "Causal-LM step time, phase by phase: GeoLoRA vs LoRA"
    common.write_table(NAME, llm_sft.command(NAME, args), title, lines, results, args.out)
    print("\n".join(lines), file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
