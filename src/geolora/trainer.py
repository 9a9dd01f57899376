"""transformers ``Trainer`` integration: no Trainer subclass, no extra call in the training loop.

The whole GeoLoRA step (integrator, rank decision, AdamW on the other parameters) lives inside
``GeoLoRAOptimizer.step()``, and the Trainer calls ``optimizer.step()`` once per optimizer step,
after all ``gradient_accumulation_steps`` micro-batches. So it is enough to hand the Trainer our
optimizer::

    optimizer, scheduler = create_geolora_optimizer(model, args, num_training_steps)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, scheduler))
    add_geolora_callback(trainer)  # rank metrics in the logs, rank history, guard

Gradient clipping (``max_grad_norm``) scales the adapter gradients ``G_K = G V``,
``G_L = Gᵀ U`` and ``G_S = Uᵀ G V`` together with the others; they are linear in the weight
gradient ``G``, so clipping acts on the geometric step as a rescaled ``G``.

The factors must never reach an ordinary optimizer: ``U.grad`` holds ``G_K``, not the gradient
of ``U``, and a plain step would destroy the orthonormal bases. :func:`check_optimizer` detects
that, and the callback runs it before the first step; without the callback the process-wide
guard (:mod:`geolora.optim.guard`) raises at the first step, before any parameter changes.

Saving: the model's ``save_pretrained`` writes the GeoLoRA adapter (:mod:`geolora.model_methods`),
so ``trainer.save_model()`` and every checkpoint directory hold ``adapter_config.json`` and
``adapter_model.safetensors`` (the active factors and ``modules_to_save``), not the base model.
:func:`add_geolora_callback` also teaches the Trainer to load such a directory when it resumes
(``trainer.train(resume_from_checkpoint=...)``) and for ``load_best_model_at_end``: the factors,
ranks and saved modules are restored in place, and the Trainer restores the optimizer, scheduler
and RNG states from its own files as usual, so the resumed run continues exactly.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler

from .io import is_geolora_adapter_dir, restore_adapter
from .model import geolora_layers, rank_report
from .optim.optimizer import GeoLoRAOptimizer
from .reports import RankHistory, write_rank_report

__all__ = [
    "GeoLoRACallback",
    "add_geolora_callback",
    "check_optimizer",
    "create_geolora_optimizer",
]

_FROM_ARGS = ("lr", "weight_decay", "betas", "eps")


def create_geolora_optimizer(
    model: nn.Module, args: TrainingArguments, num_training_steps: int, **optimizer_kwargs: Any
) -> tuple[GeoLoRAOptimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A :class:`GeoLoRAOptimizer` and the scheduler ``args`` asks for, for
    ``Trainer(..., optimizers=(optimizer, scheduler))``.

    Learning rate, weight decay and the Adam constants come from ``args`` (``learning_rate``,
    ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``); the scheduler is
    ``transformers.get_scheduler(args.lr_scheduler_type)`` with ``args``' warmup and
    ``lr_scheduler_kwargs`` over ``num_training_steps`` optimizer steps (not micro-batches).
    ``optimizer_kwargs`` go to GeoLoRAOptimizer (``base_rule``, ``momentum``,
    ``first_moment_correction``, ``other_lr``).
    """
    clash = sorted(set(optimizer_kwargs) & set(_FROM_ARGS))
    if clash:
        raise ValueError(
            f"{clash} come from TrainingArguments (learning_rate, weight_decay, adam_beta1, "
            "adam_beta2, adam_epsilon); set them there instead."
        )
    if not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise ValueError(
            f"num_training_steps must be a positive int (optimizer steps), got "
            f"{num_training_steps!r}; with max_steps unset it is "
            "ceil(len(dataloader) / gradient_accumulation_steps) * num_train_epochs."
        )
    optimizer = GeoLoRAOptimizer(
        model,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        **optimizer_kwargs,
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or None,
    )
    return optimizer, scheduler


def _innermost(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Unwrap optimizer wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Raise a ValueError unless the model's trainable GeoLoRA factors are updated by a
    :class:`GeoLoRAOptimizer` built on this model, and by nothing else.

    Catches the three ways training silently goes wrong: a plain torch optimizer (such as the
    AdamW a Trainer builds when ``optimizers`` is not given) that would overwrite the factors
    with steps along ``G_K``, ``G_L``, ``G_S``; an optimizer that leaves the factors out, so
    ranks never change; and a GeoLoRAOptimizer built on another model.
    """
    inner = _innermost(optimizer)
    layers = geolora_layers(model)
    factors = {
        id(p): f"{name}.{key}"
        for name, layer in layers.items()
        for key, p in (("U", layer.U), ("S", layer.S), ("V", layer.V))
        if p.requires_grad
    }
    if not factors:
        return
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    if not isinstance(inner, GeoLoRAOptimizer):
        if held & set(factors):
            names = sorted(factors[i] for i in held & set(factors))
            raise ValueError(
                f"GeoLoRA factors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
                f"are in a plain {type(inner).__name__}: its steps would corrupt them (their "
                ".grad holds the integrator's G V, Gᵀ U, Uᵀ G V, not gradients). Use "
                "GeoLoRAOptimizer(model, ...), with a Trainer via "
                "optimizers=create_geolora_optimizer(model, args, num_training_steps)."
            )
        raise ValueError(
            f"The optimizer ({type(inner).__name__}) does not update the GeoLoRA factors, so "
            "the adapters and their ranks would never change. Use GeoLoRAOptimizer(model, ...)."
        )
    missing = set(factors) - held
    if missing:
        names = sorted(factors[i] for i in missing)
        raise ValueError(
            f"This GeoLoRAOptimizer was built on another model: it does not hold {names[0]} "
            f"(and {len(names) - 1} more factors). Build the optimizer after the final model."
        )


def _rank_metrics(model: nn.Module, per_module: bool) -> dict[str, int]:
    report = rank_report(model)
    metrics = {
        "geolora/total_rank": report["total_rank"],
        "geolora/trainable_params": report["trainable_params"],
    }
    if per_module:
        metrics.update({f"geolora/rank/{name}": r for name, r in report["ranks"].items()})
    return metrics


class GeoLoRACallback(TrainerCallback):
    """Rank metrics in the Trainer's logs, a rank history, and an optimizer guard.

    * ``on_train_begin``: :func:`check_optimizer` on the Trainer's optimizer (raises before
      the first step if the factors would be corrupted or left untrained).
    * every optimizer step: the ranks go into :attr:`history` (a :class:`RankHistory`).
    * every log event: ``geolora/total_rank``, ``geolora/trainable_params`` and (if
      ``per_module``) ``geolora/rank/<module>`` are added to the logs and to
      ``state.log_history``. To reach the ``report_to`` integrations this callback must run
      before them; the Trainer runs callbacks passed to it after its integrations, so attach it
      with :func:`add_geolora_callback`.
    * ``on_train_end``: if ``report_dir`` is set, :func:`geolora.reports.write_rank_report`
      writes the table, history and plots there (main process only).
    """

    def __init__(self, per_module: bool = True, report_dir: str | os.PathLike | None = None):
        self.per_module = per_module
        self.report_dir = report_dir
        self.history = RankHistory()

    def _record(self, step: int, model: nn.Module | None) -> None:
        if model is not None and (not self.history.steps or step > self.history.steps[-1]):
            self.history.record(step, model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("GeoLoRACallback needs the Trainer's model and optimizer.")
        check_optimizer(optimizer, model)
        self._record(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(state.global_step, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None:
            return
        metrics = _rank_metrics(model, self.per_module)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.report_dir is not None and model is not None and state.is_world_process_zero:
            write_rank_report(model, self.history, self.report_dir)


def add_geolora_callback(
    trainer: Trainer, callback: GeoLoRACallback | None = None
) -> GeoLoRACallback:
    """Attach ``callback`` (default: a new :class:`GeoLoRACallback`) to ``trainer`` ahead of
    the ``report_to`` integrations, so that they receive the rank metrics. Returns it."""
    callback = callback if callback is not None else GeoLoRACallback()
    callbacks = trainer.callback_handler.callbacks
    if any(isinstance(cb, GeoLoRACallback) for cb in callbacks):
        raise ValueError("This Trainer already has a GeoLoRACallback.")
    callbacks.insert(0, callback)
    _load_adapter_checkpoints(trainer)
    return callback


def _load_adapter_checkpoints(trainer: Trainer) -> None:
    """Make ``trainer`` restore GeoLoRA adapter directories (its own checkpoints) in place when
    it resumes or loads the best model; other checkpoints go to the Trainer's own loaders."""
    load_checkpoint, load_best = trainer._load_from_checkpoint, trainer._load_best_model

    def load_from_checkpoint(resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if is_geolora_adapter_dir(resume_from_checkpoint):
            restore_adapter(trainer.model if model is None else model, resume_from_checkpoint)
        else:
            load_checkpoint(resume_from_checkpoint, model)

    def load_best_model() -> None:
        best = trainer.state.best_model_checkpoint
        if best is not None and is_geolora_adapter_dir(best):
            restore_adapter(trainer.model, best)
        else:
            load_best()

    trainer._load_from_checkpoint = load_from_checkpoint
    trainer._load_best_model = load_best_model
