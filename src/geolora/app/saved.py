"""The commands that work on a saved adapter: ``geolora generate``, ``export`` and ``report``.

A GeoLoRA adapter written by ``geolora finetune`` records its task in its config's ``metadata``
(``sequence-classification`` with the labels, or ``causal-lm`` with the chat-template choice) and
its base model, which is all it takes to rebuild the model it was trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import nn

from .causal_lm import Message
from .models import DEFAULT_MODEL, load_causal_lm, load_classifier
from .tables import column, read_rows

__all__ = ["adapter_dir", "load_trained_model", "run_export", "run_generate", "run_report"]

TASKS = ("sequence-classification", "causal-lm")


def adapter_dir(path: Path) -> Path:
    """The adapter directory of ``path`` (an adapter directory or a finetune run)."""
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


def load_trained_model(
    path: Path, model: str | None = None, load_in_4bit: bool = False
) -> tuple[nn.Module, Any, dict[str, Any], str]:
    """``(model with the adapter, tokenizer, task metadata, base model name)`` for the adapter
    in ``path``, on its recorded base model or ``model``."""
    from ..io import load_adapter

    adapter = adapter_dir(path)
    meta = _adapter_meta(adapter)
    config = meta.get("config", {})
    task = config.get("metadata", {})
    if task.get("task") not in TASKS:
        raise ValueError(
            f"{adapter} records no task of geolora finetune (one of {TASKS}); use it from Python "
            "with geolora.load_adapter and geolora.peft_interop.export_peft_lora."
        )
    base_name = model or meta.get("base_model_name_or_path") or DEFAULT_MODEL
    if task["task"] == "causal-lm":
        base, tokenizer = load_causal_lm(base_name)
    else:
        base, tokenizer = load_classifier(base_name, int(task["num_labels"]), task["label_names"])
    if load_in_4bit:
        from ..quantized import quantize_linear_layers

        quantize_linear_layers(base, skip=config.get("modules_to_save"))
    return load_adapter(base, adapter), tokenizer, task, base_name


def run_export(args: argparse.Namespace) -> int:
    from ..peft_interop import export_peft_lora

    adapter = adapter_dir(args.adapter)
    model, _, _, base_name = load_trained_model(adapter, args.model)
    default = adapter.parent / "peft_adapter" if adapter.name == "adapter" else None
    output = args.output or default or adapter.with_name(adapter.name + "-peft")
    export_peft_lora(model, output, base_model_name=base_name)
    print(
        f"wrote the peft LoRA adapter {output} (base model {base_name}); load it with "
        "peft.PeftModel.from_pretrained(base_model, path)"
    )
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts is not None:
        file = args.prompts
        if not file.is_file():
            raise ValueError(f"Prompt file {file} does not exist.")
        if file.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
            rows = read_rows(file)
            prompts += [
                str(p) for p in column(rows, args.prompt_column, str(file), "--prompt-column")
            ]
        else:
            prompts += [
                line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
    if not prompts:
        raise ValueError("No prompts: pass --prompt TEXT (repeatable) or --prompts FILE.")
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    from .evaluation import generate_answers

    prompts = _prompts(args)
    model, tokenizer, task, _ = load_trained_model(args.adapter, args.model, args.load_in_4bit)
    if task["task"] != "causal-lm":
        raise ValueError(f"{args.adapter} is a {task['task']} adapter; generate needs causal-lm.")
    chats: list[list[Message]] = [[{"role": "user", "content": p}] for p in prompts]
    answers = generate_answers(
        model, tokenizer, chats, args.max_new_tokens, bool(task.get("chat_template", True))
    )
    if args.output is not None:
        lines = [json.dumps({"prompt": p, "response": a}) for p, a in zip(prompts, answers)]
        args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n\n".join(answers))
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


def run_report(args: argparse.Namespace) -> int:
    from ..reports import RankHistory, format_rank_table, plot_rank_heatmap, plot_rank_history

    path = args.path
    if not path.exists():
        raise ValueError(f"{path} does not exist.")
    saved = path / "rank_report.json"
    report = (
        json.loads(saved.read_text()) if saved.is_file() else _adapter_report(adapter_dir(path))
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
