"""Training checkpoints that resume exactly: an interrupted run, resumed, continues like the
uninterrupted one (same factors, ranks, optimizer moments and dropout masks).

A checkpoint holds all state that training changes:

* every trainable parameter (the fixed-size ``U``, ``S``, ``V`` of each adapter and the
  ``modules_to_save`` weights) and every persistent buffer (each adapter's ``rank``, and
  statistics such as BatchNorm's running means that move even in a frozen base);
* the optimizer's ``state_dict()`` (for :class:`geolora.GeoLoRAOptimizer`: the per-adapter
  moments in the current bases, the current ranks, and the geometric step counter);
* the caller's step and ``extra`` data (for example a scheduler's ``state_dict()``);
* the torch random number generator states (CPU and every CUDA device).

The frozen base weights are not stored: the checkpoint is loaded into a model rebuilt the same
way. The file is written aside and renamed into place, so a crash mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .model import geolora_layers

__all__ = ["load_training_checkpoint", "save_training_checkpoint"]

FORMAT = "geolora-training-checkpoint"
VERSION = 1
_PLAIN = (str, int, float, bool, type(None), Tensor)


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _training_state(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters and persistent buffers, by state-dict key."""
    return {
        key: value.detach()
        for key, value in model.state_dict(keep_vars=True).items()
        if not isinstance(value, nn.Parameter) or value.requires_grad
    }


def _adapter_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``[out, in, r_max]`` of every adapter."""
    return {
        name: [layer.out_features, layer.in_features, layer.r_max]
        for name, layer in geolora_layers(model).items()
    }


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"{where} is a {type(value).__name__}; checkpoint extras may hold only dicts, lists, "
            "tuples, str, int, float, bool, None and tensors (store state_dict()s, not objects)."
        )


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    else:
        warnings.warn(
            f"The checkpoint holds RNG states of {len(cuda)} CUDA devices but this process sees "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}: CUDA random "
            "numbers (dropout) will not continue exactly.",
            stacklevel=3,
        )


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, flushed to disk, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_training_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save everything needed to resume training exactly (see the module docstring) to ``path``.

    ``extra`` may hold plain data and tensors only (for example ``scheduler.state_dict()``);
    :func:`load_training_checkpoint` returns it. The write is atomic. Returns the path.
    """
    model = _unwrap(model)
    if not geolora_layers(model):
        raise ValueError("This model has no GeoLoRA adapters: call get_geolora_model first.")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}.")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}.")
    _check_plain(extra, "extra")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "extra": extra,
        "adapters": _adapter_shapes(model),
        "model": _training_state(model),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
    }
    path = Path(path)
    _atomic_save(payload, path)
    return path


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"No training checkpoint at {path}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"{path} is not a readable training checkpoint (truncated or corrupt?): {err}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a GeoLoRA training checkpoint.")
    if payload.get("version") != VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {payload.get('version')}; this geolora "
            f"reads version {VERSION}."
        )
    return payload


def _names(keys: set[str]) -> str:
    shown = sorted(keys)[:5]
    return ", ".join(shown) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _validate(payload: dict[str, Any], model: nn.Module, path: Path) -> None:
    """Raise a ValueError naming what differs between the checkpoint and ``model``."""
    saved, mine = payload["adapters"], _adapter_shapes(model)
    problems = []
    if set(saved) - set(mine):
        problems.append(f"adapters missing from the model: {_names(set(saved) - set(mine))}")
    if set(mine) - set(saved):
        problems.append(f"adapters not in the checkpoint: {_names(set(mine) - set(saved))}")
    problems += [
        f"adapter {name!r} is (out, in, r_max) = {tuple(mine[name])} here but "
        f"{tuple(saved[name])} in the checkpoint"
        for name in sorted(set(saved) & set(mine))
        if list(saved[name]) != mine[name]
    ]
    state, current = payload["model"], _training_state(model)
    if not problems:
        if set(state) - set(current):
            problems.append(
                "trainable parameters or buffers missing from the model: "
                + _names(set(state) - set(current))
            )
        if set(current) - set(state):
            problems.append(
                "trainable parameters or buffers not in the checkpoint: "
                + _names(set(current) - set(state))
            )
        problems += [
            f"{key!r} has shape {tuple(current[key].shape)} here but "
            f"{tuple(state[key].shape)} in the checkpoint"
            for key in sorted(set(state) & set(current))
            if state[key].shape != current[key].shape
        ]
    if problems:
        raise ValueError(
            f"The training checkpoint {path} does not belong to this model: "
            + "; ".join(problems)
            + ". Rebuild the model with the same base model and GeoLoRAConfig (target_modules, "
            "r_max, modules_to_save) as the run that saved it."
        )


def load_training_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_training_checkpoint` into ``model`` (built
    the same way as the saved one) and ``optimizer`` (built on it), and restore the RNG states.

    Returns ``{"step": int, "extra": dict}``. Raises a ValueError naming the mismatch when the
    checkpoint belongs to another model or optimizer; nothing is changed in that case.
    """
    path = Path(path)
    payload = _read(path)
    model = _unwrap(model)
    _validate(payload, model, path)
    before = {key: value.clone() for key, value in _training_state(model).items()}
    model.load_state_dict(payload["model"], strict=False)
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError) as err:
        model.load_state_dict(before, strict=False)
        raise ValueError(
            f"The optimizer state in {path} does not fit this optimizer ({err}). Build the "
            "optimizer the same way as the run that saved it (GeoLoRAOptimizer(model, ...) on "
            "the same model)."
        ) from err
    _set_rng_state(payload["rng"])
    return {"step": payload["step"], "extra": payload["extra"]}
