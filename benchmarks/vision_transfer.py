"""Small-ViT transfer, Fashion-MNIST → MNIST-5k: GeoLoRA against head-only training, LoRA r = 8
and AdaLoRA 12 → 8.

Runs ``examples/vision.py``'s pretraining (cached) and adaptation. Each method gets the same
learning-rate sweep, every learning rate at every seed; the one with the best validation accuracy
(500 held-out training digits) averaged over the seeds is chosen, and the table reports its test
accuracy (1 000 digits) as mean ± standard deviation over the seeds, trainable parameters at the
end of training (GeoLoRA's and AdaLoRA's at their final ranks) and seconds per run. GeoLoRA runs
with the library's defaults (``--tau`` overrides τ); the row ``geolora_budget`` replaces τ by an
exact global budget of LoRA r=8's adapter parameters (``budget_unit="params"``), the largest
adapter issue 9's targets allow. Diagnostic rows say where a gap comes from
(:data:`paired.DIAGNOSTICS`): ``geolora_rank8`` is GeoLoRA's step at a fixed rank 8 (LoRA r=8's
size, no rank decision), ``geolora_rank8_scalar`` the same with the base rule
``riemannian_adam`` (one scalar second moment per adapter, the default until 2026-12-07),
``geolora_scalar`` the defaults with that rule, and ``lora_r4`` LoRA at about the defaults'
size. Everything else is identical across methods: data split, steps, batch order, head
initialisation and schedule. GeoLoRA is compared with LoRA r=8 and AdaLoRA seed by seed
(:mod:`paired`).

Each run is cached as JSON under ``<out>/runs/`` by its configuration, the pretrained ViT's
weights included (:func:`common.cached`; a GeoLoRA run's key also holds the library's source),
so a new row or seed trains only its own runs; a cached run keeps the seconds it took when it
ran. Writes ``<out>/vision_transfer.md`` and ``.json`` (``--out``, default
``benchmarks/results``); ``--smoke`` runs a few steps on a small slice of the data, into a
temporary folder, for CI.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import common
import paired
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
LRS = [1e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 1e-1, 3e-1]
LABELS = {
    "head": "head only",
    "lora": "LoRA r=8 (peft)",
    "adalora": "AdaLoRA 12→8 (peft)",
    "geolora": "GeoLoRA",
    "geolora_budget": "GeoLoRA, budget = LoRA r=8's adapter params",
    **paired.GEOLORA_DIAGNOSTIC_LABELS,
    "lora_r4": "LoRA r=4 (peft)",
}


def load_example():
    """``examples/vision.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location("vision_example", ROOT / "examples" / "vision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tau", type=float, default=None, help="GeoLoRA τ (default: library's)")
    parser.add_argument(
        "--warmup", type=int, default=0, help="lr warm-up steps before the linear decay"
    )
    parser.add_argument("--fashion-dir", type=Path, default=None)
    parser.add_argument("--pretrained-dir", type=Path, default=ROOT / "runs/vision/vit-fashion")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="vision-smoke-"))
        args.lrs, args.seeds, args.steps = args.lrs[:1], args.seeds[:2], 3
        args.pretrained_dir, args.out = tmp / "vit", tmp
    return args


def lora_adapter_params(base: nn.Module, targets: Sequence[str], r: int = 8) -> int:
    """LoRA's adapter parameters at rank ``r``, ``r (n + m)`` over the linear maps of ``base``
    whose names end with one of ``targets``."""
    return r * sum(
        module.in_features + module.out_features
        for name, module in base.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def rows(vision, base: nn.Module, geolora: dict) -> dict[str, tuple[str, dict]]:
    """Each table row's method and options (GeoLoRA's config options, LoRA's ``r``): the
    example's methods, GeoLoRA held to LoRA r=8's adapter parameters by an exact global budget,
    and the diagnostic rows of :data:`paired.DIAGNOSTICS` (GeoLoRA's step at a fixed rank 8,
    with the default base rule and with ``riemannian_adam``; the defaults with that rule;
    LoRA r=4)."""
    budget = {"budget": lora_adapter_params(base, vision.TARGETS), "budget_unit": "params"}
    out = {method: (method, geolora if method == "geolora" else {}) for method in vision.METHODS}
    out["geolora_budget"] = ("geolora", {**geolora, **budget})
    diagnostic = paired.GEOLORA_DIAGNOSTIC_ROWS
    out |= {row: ("geolora", geolora | options) for row, options in diagnostic.items()}
    out["lora_r4"] = ("lora", {"r": 4})
    return out


@dataclass(frozen=True)
class Setup:
    """What every run of a table shares (part of each run's cache key)."""

    base: str
    """Hash of the pretrained ViT's weights: a run adapts this model."""
    steps: int
    batch_size: int
    warmup: int
    data: str = "MNIST-5k, split seed 0"


def weights_hash(directory: Path) -> str:
    """Hash of the saved model's weights in ``directory``."""
    return hashlib.sha1((directory / "model.safetensors").read_bytes()).hexdigest()[:16]


def adapt_cached(
    vision, setup: Setup, out: Path, method: str, options: dict, lr: float, seed: int, **kw
) -> dict:
    """One run of ``method`` with ``options`` at ``lr`` and ``seed``, cached under ``out/runs``
    by its configuration (:func:`common.cached`; a GeoLoRA run's key holds the library's source)."""

    def compute() -> dict:
        extra = {"geolora": options} if method == "geolora" else {"lora_r": options.get("r", 8)}
        return vision.adapt(
            method,
            lr=lr,
            seed=seed,
            steps=setup.steps,
            batch_size=setup.batch_size,
            warmup=setup.warmup,
            **extra,
            **kw,
        )

    return common.cached(method, {**options, "lr": lr, "seed": seed}, setup, out, compute)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(args: argparse.Namespace, vision) -> dict:
    fashion_dir = args.fashion_dir or vision.DEFAULT_FASHION_DIR
    limit = 1024 if args.smoke else None
    epochs = 1 if args.smoke else 4
    base, pretrain = vision.pretrain(args.pretrained_dir, fashion_dir, epochs, limit=limit)
    data = vision.load_mnist_5k(seed=0)
    geolora = {} if args.tau is None else {"tau": args.tau}  # otherwise the library's defaults
    setup = Setup(weights_hash(args.pretrained_dir), args.steps, args.batch_size, args.warmup)
    cached_before = len(list((args.out / "runs").glob("*.json")))
    sweep, final = [], {}
    for row, (method, options) in rows(vision, base, geolora).items():
        runs = [
            {
                "row": row,
                **adapt_cached(
                    vision, setup, args.out, method, options, lr, seed, base=base, data=data
                ),
            }
            for lr in args.lrs
            for seed in args.seeds
        ]
        sweep += runs
        best = best_lr(runs)
        final[row] = [r for r in runs if r["lr"] == best]
        print(f"{row}: lr {best:g}, test {[r['test_acc'] for r in final[row]]}", flush=True)
    trained = len(list((args.out / "runs").glob("*.json"))) - cached_before
    return dict(
        pretrain=pretrain,
        sweep=sweep,
        final=final,
        trained=trained,
        steps=args.steps,
        batch_size=args.batch_size,
        warmup=args.warmup,
    )


def mean_acc_by_lr(runs: list[dict], split: str = "val") -> dict[float, float]:
    """Accuracy on ``split`` averaged over the seeds, per learning rate."""
    return common.mean_acc_by_lr(runs, split, lr_of=lambda r: r["lr"])


def best_lr(runs: list[dict]) -> float:
    """The learning rate whose validation accuracy, averaged over the seeds, is highest (the
    smallest such lr on a tie): one noisy seed cannot pick it."""
    means = mean_acc_by_lr(runs)
    return max(sorted(means), key=lambda lr: means[lr])


def markdown(results: dict, command: str, minutes: float) -> str:
    pre = results["pretrain"]
    lrs = sorted({r["lr"] for r in results["sweep"]})
    seeds = len(next(iter(results["final"].values())))
    lines = [
        "# Small-ViT transfer: Fashion-MNIST → MNIST-5k",
        "",
        f"Command: `{command}` ({minutes:.1f} min on {platform.machine()}, "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
        f"{results['trained']} of {len(results['sweep'])} runs trained, the others read from "
        "the run cache with the seconds they took then).",
        "",
        f"Pretrained ViT ({pre['settings']['vit']['num_hidden_layers']} layers, width "
        f"{pre['settings']['vit']['hidden_size']}, patch {pre['settings']['vit']['patch_size']}): "
        f"{pre['steps']} steps on Fashion-MNIST, test accuracy {pre['fashion_test_acc']:.4f}, "
        f"{pre['seconds']:.0f} s (cached after the first run). Adaptation on 3 500 MNIST-5k "
        f"digits, {results['steps']} steps of batch {results['batch_size']}, lr "
        + (f"rising linearly over {results['warmup']} steps, then " if results["warmup"] else "")
        + "falling linearly to 0 at the last step; "
        f"learning rate chosen by validation accuracy on 500 digits averaged over the "
        f"{seeds} seed(s), test on 1 000 digits; test accuracy is mean ± sample std over the "
        f"seeds at the chosen learning rate.",
        "",
        "| method | lr | test accuracy | trainable params | s / run | final total rank |",
        "|---|---|---|---|---|---|",
    ]
    for method, runs in results["final"].items():
        acc_mean, acc_std = mean_std([r["test_acc"] for r in runs])
        params = statistics.mean(r["trainable_params"] for r in runs)
        seconds = statistics.mean(r["seconds"] for r in runs)
        rank = (
            f"{statistics.mean(r['total_rank'] for r in runs):.0f}"
            if "total_rank" in runs[0]
            else ""
        )
        lines.append(
            f"| {LABELS[method]} | {runs[0]['lr']:g} | {acc_mean:.4f} ± {acc_std:.4f} | "
            f"{params:,.0f} | {seconds:.1f} | {rank} |"
        )
    lines += ["", *verdict_lines(results["final"])]
    for split, what, why in (
        ("val", "Validation", "it picks each lr"),
        ("test", "Test", "no choice reads it; it shows how much a gap rests on the lr pick"),
    ):
        lines += [
            "",
            f"{what} accuracy of the learning-rate sweep (mean over {seeds} seed(s); {why}):",
            "",
            "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
            "|---|" + "---|" * len(lrs),
        ]
        for method in results["final"]:
            by_lr = mean_acc_by_lr([r for r in results["sweep"] if r["row"] == method], split)
            cells = " | ".join(f"{by_lr[lr]:.3f}" for lr in lrs)
            lines.append(f"| {LABELS[method]} | {cells} |")
    geo = results["final"]["geolora"][0]
    layers = sorted({int(name.split(".")[2]) for name in geo["ranks"]})
    targets = list(dict.fromkeys(name.rsplit(".", 1)[1] for name in geo["ranks"]))
    lines += [
        "",
        "GeoLoRA final ranks, seed 0 (library defaults"
        + "".join(f", {k} = {v}" for k, v in geo["geolora"].items())
        + "):",
        "",
        "| layer | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for layer in layers:
        row = [r for name, r in geo["ranks"].items() if name.split(".")[2] == str(layer)]
        lines.append(f"| {layer} | " + " | ".join(str(r) for r in row) + " |")
    lines += [
        "",
        f"Trainable parameters include the classifier head "
        f"({results['final']['head'][0]['trainable_params']}). LoRA counts r·(n + m) per layer; "
        "GeoLoRA and AdaLoRA r·(n + m) + r at their final ranks (AdaLoRA allocates 12 triplets "
        "per layer and masks the pruned ones).",
    ]
    return "\n".join(lines) + "\n"


def verdict_lines(final: dict[str, list[dict]]) -> list[str]:
    """Issue 9's targets for each GeoLoRA row, then the diagnostic gaps, paired by seed
    (:func:`paired.target_verdicts`, :func:`paired.diagnostic_gaps`)."""
    accs = {row: {r["seed"]: r["test_acc"] for r in runs} for row, runs in final.items()}
    params = {
        row: statistics.mean(r["trainable_params"] for r in runs) for row, runs in final.items()
    }
    return [
        *paired.target_verdicts(accs, params, LABELS),
        *paired.diagnostic_gaps(accs, params, LABELS),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    vision = load_example()
    start = time.perf_counter()
    try:
        results = run(args, vision)
    except (FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    minutes = (time.perf_counter() - start) / 60
    command = "python benchmarks/vision_transfer.py " + shlex.join(argv or sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vision_transfer.md").write_text(markdown(results, command.strip(), minutes))
    (args.out / "vision_transfer.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'vision_transfer.md'} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
