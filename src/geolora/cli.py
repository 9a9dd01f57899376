"""The ``geolora`` command: ``finetune``, ``export`` and ``report``.

Option values come from three places, later ones winning: the defaults of
:class:`geolora.finetune.FinetuneOptions`, a ``--config`` file (YAML or JSON, same keys), and the
command-line flags. Errors reach the user as one line on stderr with exit status 2; Ctrl-C during
training exits with status 130 after writing a checkpoint that ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .finetune import (
    CHECKPOINT_DIR,
    DEFAULT_MODEL,
    FinetuneOptions,
    TrainingInterrupted,
    finetune,
    load_model,
    load_run_options,
)

__all__ = ["build_parser", "main"]

DEFAULTS = FinetuneOptions().to_dict()


def _names(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names")
    return names


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


# flag name -> (type, help); each one is also a config-file key (with underscores).
FINETUNE_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "model": (str, "Hugging Face model id or local directory"),
    "dataset": (
        str,
        "CSV/TSV/JSONL/JSON file or Hugging Face dataset name (default: the "
        "embedded Rotten Tomatoes sentences)",
    ),
    "text-column": (str, "column holding the text"),
    "text-pair-column": (str, "column holding the second text of a sentence pair"),
    "label-column": (str, "column holding the label"),
    "target-modules": (_names, "comma-separated module names that get adapters"),
    "modules-to-save": (_names, "comma-separated modules trained in full (default: the head)"),
    "r": (_positive_int, "initial rank of every adapter"),
    "r-max": (_positive_int, "largest rank an adapter may reach"),
    "tau": (float, "relative truncation tolerance per layer"),
    "budget": (_positive_int, "exact global budget on the total rank (replaces tau)"),
    "lora-alpha": (float, "adapter scale is lora_alpha / r"),
    "base-rule": (str, "update rule of the factors: adam or sgd"),
    "lr": (float, "peak learning rate"),
    "weight-decay": (float, "decoupled weight decay"),
    "warmup-ratio": (float, "share of the steps with linear warm-up"),
    "max-grad-norm": (float, "gradient clipping norm (0: none)"),
    "epochs": (_positive_int, "passes over the training split"),
    "batch-size": (_positive_int, "examples per step"),
    "max-length": (_positive_int, "tokens per example (longer ones are truncated)"),
    "limit": (
        _positive_int,
        "use at most this many examples (default: 6000 of the embedded "
        "data, all of a user dataset)",
    ),
    "eval-fraction": (float, "share of the examples held out for evaluation"),
    "seed": (int, "random seed (data order, initialisation, dropout)"),
    "output-dir": (str, "where the adapter, metrics and reports go"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="geolora", description="GeoLoRA: rank-adaptive low-rank adapters.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tune = commands.add_parser(
        "finetune",
        help="fine-tune a model with GeoLoRA (no arguments: the MiniLM + Rotten Tomatoes demo)",
        description="Fine-tune a sequence classifier with GeoLoRA adapters.",
    )
    for flag, (kind, text) in FINETUNE_FLAGS.items():
        default = DEFAULTS[flag.replace("-", "_")]
        if isinstance(default, list):
            default = ",".join(default)
        shown = "" if "default:" in text else f" (default: {default})"
        tune.add_argument(f"--{flag}", type=kind, default=argparse.SUPPRESS, help=text + shown)
    tune.add_argument("--config", type=Path, help="YAML or JSON file with the same keys")
    tune.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --output-dir"
    )
    tune.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    tune.add_argument("--quiet", action="store_true", help="no progress bar")

    export = commands.add_parser(
        "export", help="write a GeoLoRA adapter as a plain peft LoRA adapter"
    )
    export.add_argument("adapter", type=Path, help="GeoLoRA adapter directory or finetune run")
    export.add_argument("-o", "--output", type=Path, help="peft adapter directory to write")
    export.add_argument("--model", help="base model (default: the one the adapter records)")

    report = commands.add_parser("report", help="print the rank table of an adapter or run")
    report.add_argument("path", type=Path, help="GeoLoRA adapter directory or finetune run")
    report.add_argument("--plots", type=Path, help="also write rank plots into this directory")
    return parser


# --- finetune ------------------------------------------------------------------------------
def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"Config file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # json and yaml raise different error types
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"Config file {path} is not valid YAML/JSON: {first}") from err
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping of option names to values.")
    values = {}
    for key, value in data.items():
        flag = str(key).replace("_", "-")
        if flag not in FINETUNE_FLAGS:
            known = ", ".join(sorted(f.replace("-", "_") for f in FINETUNE_FLAGS))
            raise ValueError(f"Config file {path}: unknown key {key!r}; known keys: {known}.")
        kind = FINETUNE_FLAGS[flag][0]
        if value is not None and not (isinstance(value, list) and kind is _names):
            try:
                value = kind(str(value))
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise ValueError(f"Config file {path}: {key}: {err}") from err
        values[flag.replace("-", "_")] = value
    return values


def _finetune_options(args: argparse.Namespace) -> tuple[FinetuneOptions, bool]:
    explicit = {
        flag.replace("-", "_"): getattr(args, flag.replace("-", "_"))
        for flag in FINETUNE_FLAGS
        if hasattr(args, flag.replace("-", "_"))
    }
    from_file = _read_config_file(args.config) if args.config else {}
    chosen = {**from_file, **explicit}
    if args.resume:
        output_dir = chosen.get("output_dir", DEFAULTS["output_dir"])
        saved = load_run_options(output_dir)
        return dataclasses.replace(saved, **chosen), True
    return FinetuneOptions.from_dict({**DEFAULTS, **chosen}), False


def _run_finetune(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options, resume = _finetune_options(args)
    if not resume and (Path(options.output_dir) / CHECKPOINT_DIR).is_dir():
        print(
            f"note: {options.output_dir} holds the checkpoint of an interrupted run; this new run "
            "replaces it (pass --resume to continue that run instead).",
            file=sys.stderr,
        )
    try:
        metrics = finetune(options, resume=resume, progress=not args.quiet)
    except TrainingInterrupted as stop:
        print(
            f"\nInterrupted at step {stop.step}/{stop.total}; checkpoint written to "
            f"{stop.output_dir / 'checkpoint'}.\nResume with: geolora finetune --resume "
            f"--output-dir {stop.output_dir}",
            file=sys.stderr,
        )
        return 130
    print(format_summary(metrics, options.output_dir))
    return 0


def format_summary(metrics: dict[str, Any], output_dir: str | Path) -> str:
    """The short summary ``geolora finetune`` prints at the end."""
    share = 100 * metrics["trainable_params"] / max(1, metrics["total_params"])
    minutes, seconds = divmod(math.ceil(metrics["wall_time_s"]), 60)
    threads = metrics["threads"]
    sub = f", subsampled with limit={metrics['limit']}" if metrics["limit"] else ""
    return "\n".join(
        [
            f"{metrics['model']} on {metrics['dataset']}: {metrics['train_examples']:,} train / "
            f"{metrics['eval_examples']:,} held-out examples{sub}; {metrics['epochs']} epoch(s), "
            f"{metrics['steps']} steps",
            f"  held-out accuracy  {metrics['accuracy']:.4f}  (loss {metrics['eval_loss']:.4f})",
            f"  trainable params   {metrics['trainable_params']:,} ({share:.2f}% of "
            f"{metrics['total_params']:,}); at start {metrics['initial_trainable_params']:,}",
            f"  ranks              total {metrics['initial_total_rank']} -> "
            f"{metrics['final_total_rank']} over {metrics['adapters']} adapters (per module min "
            f"{metrics['rank_min']}, median {metrics['rank_median']}, max {metrics['rank_max']})",
            f"  time               {minutes} min {seconds:02d} s ({threads} torch threads)",
            f"  wrote              {output_dir}/: {', '.join(metrics['files'])}",
        ]
    )


# --- export and report ---------------------------------------------------------------------
def _adapter_dir(path: Path) -> Path:
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    raise ValueError(f"{path} is neither a GeoLoRA adapter directory nor a finetune run directory.")


def _adapter_meta(adapter: Path) -> dict[str, Any]:
    try:
        meta = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{adapter / 'adapter_config.json'} is not valid JSON: {err}") from err
    if meta.get("format") != "geolora-adapter":
        raise ValueError(f"{adapter} holds no GeoLoRA adapter (a peft adapter?).")
    return meta


def _run_export(args: argparse.Namespace) -> int:
    from .io import load_adapter
    from .peft_interop import export_peft_lora

    adapter = _adapter_dir(args.adapter)
    meta = _adapter_meta(adapter)
    extra = meta.get("config", {}).get("metadata", {})
    if extra.get("task") != "sequence-classification":
        raise ValueError(
            f"{adapter} does not record a sequence-classification task (it was not written by "
            "geolora finetune); export it in Python with geolora.peft_interop.export_peft_lora."
        )
    base_name = args.model or meta.get("base_model_name_or_path") or DEFAULT_MODEL
    model, _ = load_model(base_name, int(extra["num_labels"]), extra.get("label_names"))
    load_adapter(model, adapter)
    default = adapter.parent / "peft_adapter" if adapter.name == "adapter" else None
    output = args.output or default or adapter.with_name(adapter.name + "-peft")
    export_peft_lora(model, output, base_model_name=base_name)
    print(
        f"wrote the peft LoRA adapter {output} (base model {base_name}); load it with "
        "peft.PeftModel.from_pretrained(base_model, path)"
    )
    return 0


def _adapter_report(adapter: Path) -> dict[str, Any]:
    """Ranks, per-module r_max and adapter parameters ``r (n + m) + r`` from the files alone."""
    from safetensors import safe_open

    meta = _adapter_meta(adapter)
    r_max = int(meta["config"]["r_max"])
    report: dict[str, Any] = {"ranks": dict(meta["ranks"]), "r_max": {}, "params": {}}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as tensors:
        for name, rank in meta["ranks"].items():
            n = tensors.get_slice(f"{name}.U").get_shape()[0]
            m = tensors.get_slice(f"{name}.V").get_shape()[0]
            report["r_max"][name] = min(r_max, n, m)
            report["params"][name] = rank * (n + m) + rank
    return report


def _run_report(args: argparse.Namespace) -> int:
    from .reports import RankHistory, format_rank_table, plot_rank_heatmap, plot_rank_history

    path = args.path
    if not path.exists():
        raise ValueError(f"{path} does not exist.")
    saved = path / "rank_report.json"
    report = (
        json.loads(saved.read_text()) if saved.is_file() else _adapter_report(_adapter_dir(path))
    )
    print(format_rank_table(report))
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        written = [plot_rank_heatmap(report["ranks"], args.plots / "rank_heatmap.png")]
        if (path / "rank_history.json").is_file():
            history = RankHistory.from_json(path / "rank_history.json")
            written.append(plot_rank_history(history, args.plots / "rank_history.png"))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``geolora`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    run = {"finetune": _run_finetune, "export": _run_export, "report": _run_report}
    try:
        return run[args.command](args)
    except (ValueError, OSError, ImportError) as err:
        if args.debug:
            raise
        message = str(err).strip() or type(err).__name__
        print(f"geolora: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ngeolora: interrupted (no checkpoint written).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
