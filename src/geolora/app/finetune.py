"""The ``geolora finetune`` job as a library function: :func:`finetune(options) <finetune>`.

The task's model gets GeoLoRA adapters (:mod:`geolora.app.jobs`: a sequence classifier with its
head trained in full, or a causal LM trained on its answer tokens), trains with
:class:`geolora.GeoLoRAOptimizer` under a linear warm-up/decay schedule

    λ(t) = λ · (t + 1) / w             for t < w   (w = warmup steps)
    λ(t) = λ · (T − t) / (T − w)       for w ≤ t < T,

is evaluated on a held-out split (:mod:`geolora.app.evaluation`) and written out: the GeoLoRA
adapter, the same adapter as a plain peft LoRA adapter, optionally the merged model,
``metrics.json`` and the rank report. Ctrl-C stops at the end of the current step and writes a
checkpoint that ``resume=True`` continues exactly (same batches, dropout masks, factors, ranks
and optimizer moments).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..checkpoint import load_training_checkpoint, save_training_checkpoint
from ..io import save_adapter
from ..merge import merge_and_unload
from ..model import rank_report
from ..optim.optimizer import GeoLoRAOptimizer
from ..peft_interop import export_peft_lora
from ..reports import RankHistory, write_rank_report
from .batches import epoch_batches, steps_per_epoch
from .jobs import Job, build_job
from .options import RUNTIME_OPTIONS, FinetuneOptions

__all__ = [
    "CHECKPOINT_DIR",
    "TrainingInterrupted",
    "finetune",
    "learning_rate_at",
    "load_run_options",
]

CHECKPOINT_DIR = "checkpoint"


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C once the checkpoint is written; carries where and at which step."""

    def __init__(self, output_dir: Path, step: int, total: int) -> None:
        super().__init__(f"interrupted at step {step}/{total}; checkpoint in {output_dir}")
        self.output_dir, self.step, self.total = output_dir, step, total


# --- training ------------------------------------------------------------------------------
def learning_rate_at(step: int, total: int, lr: float, warmup: int) -> float:
    """The schedule of the module docstring: linear warm-up over ``warmup`` steps, then linear
    decay to 0 at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


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


def _check_resumable(options: FinetuneOptions, out: Path) -> None:
    saved = load_run_options(out).to_dict()
    differ = sorted(
        k for k, v in saved.items() if k not in RUNTIME_OPTIONS and options.to_dict()[k] != v
    )
    if differ:
        raise ValueError(
            f"--resume continues the run in {out} with its own options; these differ: "
            f"{differ}. Drop them, or start a new run in another --output-dir."
        )


def _write_outputs(job: Job, options: FinetuneOptions, history: RankHistory) -> list[str]:
    """Adapter, peft export, merged model (``save_merged``) and rank report; their names."""
    out, model = Path(options.output_dir), job.model
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out / "adapter", base_model_name=options.model_name)
    export_peft_lora(model, out / "peft_adapter", base_model_name=options.model_name)
    files = [
        "adapter",
        "peft_adapter",
        *(p.name for p in write_rank_report(model, history, out).values()),
    ]
    if options.save_merged:
        if options.load_in_4bit:
            from ..quantized import dequantize_model

            dequantize_model(model)
        merged = merge_and_unload(model)
        merged.save_pretrained(out / "merged")
        job.tokenizer.save_pretrained(out / "merged")
        files.append("merged")
    return files


def _train_step(
    model: nn.Module, batch: dict[str, Any], optimizer: GeoLoRAOptimizer, lr: float, clip: float
) -> float:
    loss = model(**batch).loss
    loss.backward()
    if clip > 0:
        trainable = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def finetune(
    options: FinetuneOptions,
    resume: bool = False,
    progress: bool | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the job of the module docstring and return the metrics written to ``metrics.json``.

    ``resume=True`` continues the interrupted run in ``options.output_dir`` (its options must
    equal ``options`` but for :data:`RUNTIME_OPTIONS`). ``progress`` (default: not
    ``options.quiet``) shows a progress bar; ``on_step(step)`` is called after every optimizer
    step. Raises :class:`TrainingInterrupted` after Ctrl-C, once the checkpoint is written.
    """
    out = Path(options.output_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    if resume:
        _check_resumable(options, out)
    if options.threads:
        torch.set_num_threads(options.threads)
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    job = build_job(options)
    model, train = job.model, job.train
    initial = rank_report(model)
    rule = options.task_base_rule
    optimizer_options = {} if rule is None else {"base_rule": rule}
    optimizer = GeoLoRAOptimizer(
        model,
        lr=options.peak_lr,
        weight_decay=options.weight_decay,
        first_moment_correction=options.first_moment_correction,
        **optimizer_options,
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
    model.train()
    bar = _progress(total, step, not options.quiet if progress is None else progress)
    lengths, batch_ids = train.lengths(), []
    with _StopOnSigint() as stop:
        while step < total:
            epoch, index = divmod(step, per_epoch)
            if index == 0 or not batch_ids:
                batch_ids = epoch_batches(lengths, options.batch_size, options.seed, epoch)
            if index == 0:
                state["loss_sum"] = 0.0
            t0 = time.perf_counter()
            lr = learning_rate_at(step, total, options.peak_lr, warmup)
            value = _train_step(
                model, train.batch(batch_ids[index]), optimizer, lr, options.max_grad_norm
            )
            step += 1
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
    scores = job.evaluate(model)
    final = rank_report(model)
    files = _write_outputs(job, options, history)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    metrics = {
        "task": options.task,
        **scores,
        "train_loss_last_epoch": state["loss_sum"] / per_epoch,
        "model": options.model_name,
        **job.info,
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
        "peak_lr": options.peak_lr,  # the lr used, also when options.lr is the task's default
        "base_rule": optimizer.param_groups[0]["base_rule"],  # likewise the rule used
        "first_moment_correction": optimizer.param_groups[0]["first_moment_correction"],
        "options": options.to_dict(),
        "files": sorted([*files, "metrics.json"]),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
