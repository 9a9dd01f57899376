"""The ``geolora`` command: ``finetune``, ``generate``, ``export`` and ``report``.

``finetune`` options come from three places, later ones winning: the defaults (the fields of
:class:`geolora.app.options.FinetuneOptions` and :class:`geolora.GeoLoRAConfig`), a ``--config``
file (YAML or JSON, the same names) and the command-line flags. Errors reach the user as one line
on stderr with exit status 2; Ctrl-C during training exits with status 130 after writing a
checkpoint that ``--resume`` continues. Output cut short by a closed pipe (``| head``) ends quietly
with status 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .finetune import CHECKPOINT_DIR, TrainingInterrupted, finetune, load_run_options
from .options import FinetuneOptions, OptionSpec, option_specs
from .saved import run_export, run_generate, run_report

__all__ = ["build_parser", "main"]

SPECS = {spec.name: spec for spec in option_specs()}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_option(parser: argparse.ArgumentParser, spec: OptionSpec) -> None:
    if spec.is_switch:
        off = spec.switched_on
        action = "store_false" if off else "store_true"
        shown = f"turns off (on by default): {spec.help}" if off else spec.help
        parser.add_argument(
            spec.command_line_flag,
            dest=spec.name,
            action=action,
            default=argparse.SUPPRESS,
            help=shown,
        )
        return
    default = spec.default
    if isinstance(default, list):
        default = ",".join(default)
    shown = "" if "default:" in spec.help or default is None else f" (default: {default})"
    parser.add_argument(
        spec.flag,
        dest=spec.name,
        type=spec.parse,
        choices=spec.choices,
        default=argparse.SUPPRESS,
        help=spec.help + shown,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="geolora", description="GeoLoRA: rank-adaptive low-rank adapters.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tune = commands.add_parser(
        "finetune",
        help="fine-tune a model with GeoLoRA (no arguments: the MiniLM + Rotten Tomatoes demo)",
        description="Fine-tune a sequence classifier (default) or a causal LM with GeoLoRA.",
    )
    run = tune.add_argument_group("run options")
    adapter = tune.add_argument_group("adapter options (GeoLoRAConfig)")
    for spec in SPECS.values():
        _add_option(adapter if spec.in_adapter else run, spec)
    tune.add_argument("--config", type=Path, help="YAML or JSON file with the same keys")
    tune.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --output-dir"
    )

    generate = commands.add_parser("generate", help="answer prompts with a causal-LM adapter")
    generate.add_argument("adapter", type=Path, help="GeoLoRA adapter directory or finetune run")
    generate.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    generate.add_argument(
        "--prompts",
        type=Path,
        help="file of prompts: .jsonl/.csv/.json with a prompt column, or text lines",
    )
    generate.add_argument("--prompt-column", default="prompt", help="column of --prompts")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer")
    generate.add_argument("--model", help="base model (default: the one the adapter records)")
    generate.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 base")
    generate.add_argument("-o", "--output", type=Path, help="write prompt/response JSONL here")

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
        name = str(key).replace("-", "_")
        if name not in SPECS:
            known = ", ".join(sorted(SPECS))
            raise ValueError(f"Config file {path}: unknown key {key!r}; known keys: {known}.")
        try:
            values[name] = SPECS[name].convert(value)
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise ValueError(f"Config file {path}: {key}: {err}") from err
    return values


def _finetune_options(args: argparse.Namespace) -> tuple[FinetuneOptions, bool]:
    explicit = {name: getattr(args, name) for name in SPECS if hasattr(args, name)}
    from_file = _read_config_file(args.config) if args.config else {}
    chosen = {**from_file, **explicit}
    if args.resume:
        output_dir = chosen.get("output_dir", SPECS["output_dir"].default)
        saved = load_run_options(output_dir).to_dict()
        adapter = {
            **saved.pop("adapter"),
            **{k: v for k, v in chosen.items() if SPECS[k].in_adapter},
        }
        run = {**saved, **{k: v for k, v in chosen.items() if not SPECS[k].in_adapter}}
        return FinetuneOptions.from_dict({**run, "adapter": adapter}), True
    return FinetuneOptions.from_dict(chosen), False


def _run_finetune(args: argparse.Namespace) -> int:
    options, resume = _finetune_options(args)
    if not resume and (Path(options.output_dir) / CHECKPOINT_DIR).is_dir():
        print(
            f"note: {options.output_dir} holds the checkpoint of an interrupted run; this new run "
            "replaces it (pass --resume to continue that run instead).",
            file=sys.stderr,
        )
    try:
        metrics = finetune(options, resume=resume)
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


def _score_line(metrics: dict[str, Any]) -> str:
    if metrics["task"] == "causal-lm":
        label = f", label accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else ""
        return (
            f"  held-out answers   exact match {metrics['exact_match']:.4f}{label}  (loss "
            f"{metrics['eval_loss']:.4f} per answer token, perplexity {metrics['perplexity']:.2f})"
        )
    return f"  held-out accuracy  {metrics['accuracy']:.4f}  (loss {metrics['eval_loss']:.4f})"


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
            _score_line(metrics),
            f"  trainable params   {metrics['trainable_params']:,} ({share:.2f}% of "
            f"{metrics['total_params']:,}); at start {metrics['initial_trainable_params']:,}",
            f"  ranks              total {metrics['initial_total_rank']} -> "
            f"{metrics['final_total_rank']} over {metrics['adapters']} adapters (per module min "
            f"{metrics['rank_min']}, median {metrics['rank_median']}, max {metrics['rank_max']})",
            f"  time               {minutes} min {seconds:02d} s ({threads} torch threads)",
            f"  wrote              {output_dir}/: {', '.join(metrics['files'])}",
        ]
    )


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _silence_stdout() -> None:
    """After the reader of our output went away (``| head``): point stdout at /dev/null so that
    the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``geolora`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    run = {
        "finetune": _run_finetune,
        "generate": run_generate,
        "export": run_export,
        "report": run_report,
    }
    try:
        status = run[args.command](args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return 0
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
