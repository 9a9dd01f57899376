"""The demo (``geolora finetune`` with its defaults) against peft LoRA r=8 on the same data,
steps and seed.

GeoLoRA runs through :func:`geolora.finetune.finetune` itself, so the figure is the demo's. peft
LoRA (``LoraConfig(r=8, lora_alpha=16)``, the same ``target_modules``, the classifier in
``modules_to_save``) is trained by the same loop: the same model load after
``torch.manual_seed(seed)`` (hence the same classifier initialisation), the same batches
(:func:`geolora.app.batches.epoch_batches`), the same warm-up/decay schedule, gradient clipping and
evaluation, with ``torch.optim.AdamW``. Each method runs at several learning rates; the table
reports all of them.

Usage (from the repository root; a few minutes per run on 2 CPU cores)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_vs_lora.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_vs_lora.py --runs geolora:1e-3 lora:1e-3
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_vs_lora.py --runs geolora:1e-3,tau=0.05

A run is ``method:lr``, optionally with changed demo options (``,tau=0.05``, ``,seed=1``; a seed
changes the data split, the held-out set and the initialisation, for both methods alike).

Every run is stored in ``benchmarks/results/demo_vs_lora_runs/`` (keyed by method, learning
rate and the demo options, so runs can be split across processes); the tables
``benchmarks/results/demo_vs_lora.{md,json}`` are rebuilt from all stored runs of the current
options, GeoLoRA runs only where they were trained by the current library source (its
fingerprint is stored with the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from methods import geolora_fingerprint  # noqa: E402

from geolora.app.batches import epoch_batches, steps_per_epoch  # noqa: E402
from geolora.app.classification import encode, load_task  # noqa: E402
from geolora.app.evaluation import evaluate_classifier  # noqa: E402
from geolora.app.finetune import finetune, learning_rate_at  # noqa: E402
from geolora.app.jobs import DEMO_LIMIT  # noqa: E402
from geolora.app.models import DEFAULT_TARGETS, default_targets, load_classifier  # noqa: E402
from geolora.app.options import FinetuneOptions, option_specs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "demo_vs_lora_runs"
DEFAULT_RUNS = (
    *("geolora:5e-4", "geolora:1e-3", "geolora:2e-3"),
    *("lora:5e-4", "lora:1e-3", "lora:2e-3"),
)


def options_key(options: FinetuneOptions) -> str:
    fields = {k: v for k, v in options.to_dict().items() if k not in ("lr", "output_dir")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def run_geolora(options: FinetuneOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        metrics = finetune(dataclasses.replace(options, output_dir=out), progress=True)
    return {
        "accuracy": metrics["accuracy"],
        "eval_loss": metrics["eval_loss"],
        "trainable_params": metrics["trainable_params"],
        "initial_trainable_params": metrics["initial_trainable_params"],
        "final_total_rank": metrics["final_total_rank"],
        "steps": metrics["steps"],
        "train_time_s": metrics["train_time_s"],
        "code": geolora_fingerprint(),
    }


def run_lora(options: FinetuneOptions) -> dict[str, Any]:
    """peft LoRA r=8 through the demo's loop (see the module docstring)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(options.seed)
    limit = options.limit if options.limit is not None or options.dataset else DEMO_LIMIT
    task = load_task(
        options.dataset, options.text_column, options.label_column, options.text_pair_column,
        options.eval_fraction, options.seed, limit,
    )  # fmt: skip
    model, tokenizer = load_classifier(options.model_name, len(task.label_names), task.label_names)
    train, held_out = (encode(tokenizer, s, options.token_limit) for s in (task.train, task.eval))
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=options.adapter.get("target_modules") or default_targets(model),
        modules_to_save=["classifier"],
    )
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    per_epoch = steps_per_epoch(len(train), options.batch_size)
    total = per_epoch * options.epochs
    warmup = int(options.warmup_ratio * total)
    lengths = train.lengths()
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(total), desc="lora", unit="step", mininterval=10):
        epoch, index = divmod(step, per_epoch)
        if index == 0:
            batches = epoch_batches(lengths, options.batch_size, options.seed, epoch)
        model(**train.batch(batches[index])).loss.backward()
        if options.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, options.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, total, options.lr, warmup)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_time = time.perf_counter() - start
    scores = evaluate_classifier(model, held_out, batch_size=max(64, 2 * options.batch_size))
    return {
        **scores,
        "trainable_params": sum(p.numel() for p in trainable),
        "steps": total,
        "train_time_s": round(train_time, 2),
    }


def _variant(run: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(run.get("overrides", {}).items()))


def tables(options: FinetuneOptions, key: str) -> tuple[str, dict[str, Any]]:
    stored = [json.loads(file.read_text()) for file in sorted(RUNS.glob(f"*-{key}.json"))]
    code = geolora_fingerprint()
    runs = [r for r in stored if r["method"] != "geolora" or r.get("code") == code]
    runs.sort(key=lambda r: (r["method"], _variant(r), r["lr"]))
    plain = [r for r in runs if not r.get("overrides")]
    demo = next((r for r in plain if r["method"] == "geolora" and r["lr"] == options.lr), None)
    best_lora = max((r for r in plain if r["method"] == "lora"), key=lambda r: r["accuracy"])
    groups: dict[tuple[str, float, str], list[float]] = {}
    for r in runs:
        other = {k: v for k, v in r.get("overrides", {}).items() if k != "seed"}
        name = ", ".join(f"{k}={v}" for k, v in sorted(other.items()))
        groups.setdefault((r["method"], r["lr"], name), []).append(r["accuracy"])
    seeds = {g: accs for g, accs in groups.items() if len(accs) > 1}
    summary = {
        "options": options.to_dict(),
        "options_key": key,
        "runs": runs,
        "demo_accuracy": demo and demo["accuracy"],
        "best_lora_accuracy": best_lora["accuracy"],
        "best_lora_lr": best_lora["lr"],
        "over_seeds": [
            {"method": m, "lr": lr, "variant": v, "accuracies": accs}
            for (m, lr, v), accs in seeds.items()
        ],
    }
    adapter = options.adapter_config(DEFAULT_TARGETS["bert"])
    lines = [
        "# The demo against peft LoRA r=8",
        "",
        f"all-MiniLM-L6-v2, {options.dataset or 'embedded Rotten Tomatoes sentences'} "
        f"(limit {options.limit or DEMO_LIMIT}, {int(options.eval_fraction * 100)}% held out), "
        f"{options.epochs} epochs, batch {options.batch_size}, max_length {options.token_limit}, "
        f"seed {options.seed}, warm-up {options.warmup_ratio:g} then linear decay, clip "
        f"{options.max_grad_norm:g}. Adapters on {', '.join(adapter.target_modules)}; "
        "classifier trained in full. GeoLoRA: "
        f"r={adapter.r}, r_max={adapter.r_max}, tau={adapter.tau:g}, base_rule "
        f"{options.base_rule or 'default'}. LoRA: r=8, lora_alpha=16, AdamW. A variant changes "
        "the named options (a seed changes the data split and the held-out set too, for both "
        "methods).",
        "",
        "| method | variant | lr | held-out accuracy | eval loss | trainable params "
        "| train time (s), threads |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        name = "GeoLoRA" if r["method"] == "geolora" else "LoRA r=8"
        variant = _variant(r) or ("**demo default**" if r is demo else "")
        params = f"{r['trainable_params']:,}"
        if r["method"] == "geolora":
            params += f" (start {r['initial_trainable_params']:,}, rank {r['final_total_rank']})"
        lines.append(
            f"| {name} | {variant} | {r['lr']:g} | {r['accuracy']:.4f} | {r['eval_loss']:.4f} "
            f"| {params} | {r['train_time_s']:.0f}, {r['threads']} |"
        )
    if seeds:
        lines += ["", "Over seeds:", "", "| method | variant | lr | seeds | mean accuracy |"]
        lines.append("|---|---|---|---|---|")
        for (m, lr, v), accs in seeds.items():
            name = "GeoLoRA" if m == "geolora" else "LoRA r=8"
            mean = sum(accs) / len(accs)
            lines.append(f"| {name} | {v} | {lr:g} | {len(accs)} | {mean:.4f} |")
    lines += [
        "",
        "Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/demo_vs_lora.py` (variants: "
        "`--runs geolora:1e-3,tau=0.05 lora:5e-4,seed=1 ...`). Train times are wall-clock on a "
        "shared machine.",
    ]
    return "\n".join(lines) + "\n", summary


def parse_spec(spec: str, options: FinetuneOptions) -> tuple[str, float, dict[str, Any]]:
    """``method:lr[,key=value...]`` -> method, lr and option overrides (typed like the field)."""
    head, *pairs = spec.split(",")
    method, _, lr_text = head.partition(":")
    if method not in ("geolora", "lora"):
        raise ValueError(f"unknown method {method!r} in {spec!r}; use geolora:LR or lora:LR")
    overrides, specs = {}, {s.name: s for s in option_specs()}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in specs or name in ("lr", "output_dir"):
            raise ValueError(f"{spec!r}: {name!r} is not an option that a variant may change")
        overrides[name] = specs[name].convert(value)
    return method, float(lr_text), overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="*", default=list(DEFAULT_RUNS), help="method:lr[,key=value...] ..."
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    options = FinetuneOptions()
    key = options_key(options)
    RUNS.mkdir(parents=True, exist_ok=True)
    specs = []
    for spec in args.runs:
        try:
            specs.append(parse_spec(spec, options))
        except ValueError as err:
            parser.error(str(err))
    for method, lr, overrides in specs:
        run = run_geolora if method == "geolora" else run_lora
        print(f"{method} lr={lr:g} {overrides} ...", file=sys.stderr, flush=True)
        chosen = {**options.to_dict(), "lr": lr, **overrides}
        result = run(FinetuneOptions.from_dict(chosen))
        result = {"method": method, "lr": lr, "overrides": overrides, **result}
        result["threads"] = args.threads
        print(json.dumps(result), file=sys.stderr, flush=True)
        suffix = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        (RUNS / f"{method}-{lr:g}{suffix}-{key}.json").write_text(json.dumps(result, indent=1))
    markdown, summary = tables(options, key)
    (RESULTS / "demo_vs_lora.md").write_text(markdown)
    (RESULTS / "demo_vs_lora.json").write_text(json.dumps(summary, indent=1))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
