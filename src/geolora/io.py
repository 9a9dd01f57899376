"""Saving and loading GeoLoRA adapters: a directory with ``adapter_config.json`` and
``adapter_model.safetensors``.

Only the active factors are stored. A layer at rank ``r`` keeps ``U[:, :r]`` (n × r), the singular
values ``σ = diag(S)[:r]`` (a vector; the r × r matrix if ``S`` is not diagonal) and ``V[:, :r]``
(m × r), so that the adapter is ``ΔW = s · U diag(σ) Vᵀ`` with the recorded scale ``s``; every
``modules_to_save`` module is stored in full. The config records the :class:`GeoLoRAConfig`, the
integer rank of every module, ``s``, the library version, the base model's name and the SHA-256 of
the tensor file (so that damaged tensor data is caught, not only a damaged header).

The save is atomic: both files are written and fsynced in the sibling ``.<name>.geolora-tmp``; then
the old directory is renamed to ``.<name>.geolora-old``, the new one renamed into place and the old
one deleted. A crash before the first rename leaves the old adapter untouched; a crash between the
renames leaves it in the backup, which the next :func:`load_adapter` or :func:`save_adapter`
restores. Not safe for two processes saving to the same path at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from .config import GeoLoRAConfig
from .model import find_target_names, geolora_layers, get_geolora_model, name_matches
from .quantized import is_4bit

__all__ = ["AdapterError", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "geolora-adapter"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded as it is (damaged, inconsistent or mismatched)."""


# --- shared helpers (also used by peft_interop) ----------------------------------------------
def geolora_root(model: nn.Module) -> tuple[nn.Module, GeoLoRAConfig]:
    """The module that carries ``geolora_config`` (the model itself, or the model inside a DDP,
    accelerate or ``torch.compile`` wrapper) and that config."""
    for module in model.modules():
        config = getattr(module, "geolora_config", None)
        if isinstance(config, GeoLoRAConfig):
            return module, config
    raise ValueError(
        "This model has no GeoLoRA adapters: call get_geolora_model(model, config) or "
        "load_adapter(model, path) first."
    )


def saved_module_names(model: nn.Module, config: GeoLoRAConfig) -> list[str]:
    """Full names of the ``modules_to_save`` modules (outermost matches only)."""
    keys = config.modules_to_save or []
    names = [n for n, _ in model.named_modules() if n and any(name_matches(n, k) for k in keys)]
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def model_name_or_path(model: nn.Module) -> str | None:
    """``model.config._name_or_path`` of a transformers model, if set."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def write_adapter_dir(path: Path, files: dict[str, bytes]) -> Path:
    """Replace the directory ``path`` by one holding exactly ``files``, atomically (module doc)."""
    path = Path(path)
    _recover(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} is a file; an adapter is a directory: use another path.")
        others = sorted(p.name for p in path.iterdir() if p.name not in files)
        if others:
            raise FileExistsError(
                f"{path} holds files other than an adapter's ({others[:5]}); saving replaces the "
                "whole directory, so choose an empty directory or an earlier adapter directory."
            )
    tmp = _sibling(path, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        _write(tmp / name, data)
    _swap_in(tmp, path)
    return path


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.geolora-{kind}"


def _write(file: Path, data: bytes) -> None:
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _swap_in(tmp: Path, path: Path) -> None:
    if path.exists():
        backup = _sibling(path, "old")
        os.replace(path, backup)
        os.replace(tmp, path)
        shutil.rmtree(backup)
    else:
        os.replace(tmp, path)
    if os.name == "posix":
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _recover(path: Path) -> None:
    """Finish an interrupted swap: restore the backup if ``path`` is gone, else drop it."""
    backup = _sibling(path, "old")
    if not backup.exists():
        return
    if path.exists():
        shutil.rmtree(backup)
    else:
        os.replace(backup, path)


# --- save ----------------------------------------------------------------------------------
def _tensors(root: nn.Module, config: GeoLoRAConfig) -> dict[str, Tensor]:
    tensors = {}
    for name, layer in geolora_layers(root).items():
        u, s, v = (t.detach() for t in layer.active_factors())
        sigma = torch.diagonal(s)
        tensors[f"{name}.U"] = u
        tensors[f"{name}.S"] = sigma if torch.equal(s, torch.diag(sigma)) else s
        tensors[f"{name}.V"] = v
    for name in saved_module_names(root, config):
        for key, value in root.get_submodule(name).state_dict().items():
            tensors[f"{name}.{key}"] = value.detach()
    return {k: t.cpu().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}


def save_adapter(model: nn.Module, path: str | Path, base_model_name: str | None = None) -> Path:
    """Save the active GeoLoRA factors and ``modules_to_save`` of ``model`` to the directory
    ``path`` (created or atomically replaced); returns ``path``.

    ``base_model_name`` is recorded (default: ``model.config._name_or_path`` when set).
    """
    from . import __version__

    root, config = geolora_root(model)
    blob = save_safetensors(_tensors(root, config), metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "geolora_version": __version__,
        "base_model_name_or_path": base_model_name or model_name_or_path(root),
        "scale": config.scale,
        "ranks": {name: layer.current_rank for name, layer in geolora_layers(root).items()},
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "config": config.to_dict(),
    }
    try:
        text = json.dumps(meta, indent=2)
    except TypeError as err:
        raise ValueError(f"GeoLoRAConfig.metadata must be JSON-serialisable: {err}") from err
    return write_adapter_dir(Path(path), {WEIGHTS_NAME: blob, CONFIG_NAME: text.encode()})


# --- load ----------------------------------------------------------------------------------
def _read_config(path: Path) -> tuple[dict[str, Any], GeoLoRAConfig]:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: {path} is not a GeoLoRA adapter directory (write one with "
            "geolora.save_adapter)."
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{file} is not valid JSON ({err}): restore it or save again.") from err
    if isinstance(meta, dict) and "peft_type" in meta:
        raise AdapterError(
            f"{file} is a peft adapter, not a GeoLoRA one: load it with peft, or start GeoLoRA "
            "from it with geolora_from_peft(base_model, path)."
        )
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterError(f"{file} is not a GeoLoRA adapter config (no 'format': '{FORMAT}').")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterError(
            f"{file} has format_version {version!r}; this geolora reads up to "
            f"{FORMAT_VERSION}: upgrade geolora."
        )
    ranks, scale = meta.get("ranks"), meta.get("scale")
    if not (
        isinstance(ranks, dict)
        and ranks
        and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks.values())
    ):
        raise AdapterError(f"{file}: 'ranks' must map module names to positive integers.")
    if not isinstance(meta.get("weights_sha256"), str):
        raise AdapterError(f"{file}: 'weights_sha256' is missing: restore the file or save again.")
    try:
        config = GeoLoRAConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{file}: invalid 'config' ({err}).") from err
    if not isinstance(scale, (int, float)) or not math.isclose(scale, config.scale, rel_tol=1e-9):
        raise AdapterError(
            f"{file}: records scale {scale!r}, but its config gives {config.scale!r}: the file "
            "was edited; restore it or save again."
        )
    return meta, config


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], str]:
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the adapter in {path} is incomplete.")
    blob = file.read_bytes()
    try:
        tensors = load_safetensors(blob)
    except SafetensorError as err:
        raise AdapterError(
            f"{file} is corrupt or truncated ({err}): restore it from a copy or save again."
        ) from err
    return tensors, hashlib.sha256(blob).hexdigest()


def _weight_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(n, m)`` = (out, in) of the matrix an adapter on ``module`` modifies."""
    if is_4bit(module):  # packed 4-bit weight: the true shape is in the attributes
        return module.out_features, module.in_features
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        return None
    if type(module).__name__ == "Conv1D":
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight[0].numel()


def _names(items: set[str]) -> str:
    listed = sorted(items)
    return f"{listed[:8]}{' ...' if len(listed) > 8 else ''}"


def _validate(
    base: nn.Module, path: Path, meta: dict, config: GeoLoRAConfig, tensors: dict[str, Tensor]
) -> None:
    """Raise AdapterError naming the first mismatch between the files and ``base``."""
    ranks: dict[str, int] = meta["ranks"]
    try:
        targets = set(find_target_names(base, config))
    except ValueError as err:
        raise AdapterError(f"The adapter in {path} does not fit this base model: {err}") from err
    if targets != set(ranks):
        raise AdapterError(
            f"The adapter in {path} has modules {_names(set(ranks) - targets)} that this base "
            f"model does not select, and the base model selects {_names(targets - set(ranks))} "
            "that the adapter lacks: load it on the architecture it was trained on."
        )
    expected = {f"{name}.{part}": None for name in ranks for part in "USV"}
    for name in saved_module_names(base, config):
        for key, value in base.get_submodule(name).state_dict().items():
            expected[f"{name}.{key}"] = tuple(value.shape)
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        raise AdapterError(
            f"{path / WEIGHTS_NAME} does not match {CONFIG_NAME}: missing tensors "
            f"{_names(missing)}, unexpected tensors {_names(extra)}. Restore both files from "
            "the same save."
        )
    for name, r in ranks.items():
        u, s, v = (tensors[f"{name}.{part}"] for part in "USV")
        if (
            u.dim() != 2
            or v.dim() != 2
            or (u.shape[1], v.shape[1]) != (r, r)
            or (tuple(s.shape) not in ((r,), (r, r)))
        ):
            raise AdapterError(
                f"Module {name!r}: {CONFIG_NAME} records rank {r}, but {WEIGHTS_NAME} holds U "
                f"{tuple(u.shape)}, S {tuple(s.shape)}, V {tuple(v.shape)}: the files in {path} "
                "do not belong together; restore both from the same save."
            )
        have = _weight_shape(base.get_submodule(name))
        want = (u.shape[0], v.shape[0])
        if have != want:
            raise AdapterError(
                f"Module {name!r}: the adapter in {path} was trained for a weight of shape {want} "
                f"(out × in), but this base model's module has {have}: load it on the base model "
                "it was trained with."
            )
        if r > min(config.r_max, *want):
            raise AdapterError(
                f"Module {name!r}: rank {r} exceeds r_max={config.r_max} or the weight's size "
                f"{want}: {CONFIG_NAME} is inconsistent; restore it or save again."
            )
    for key, shape in expected.items():
        if shape is not None and tuple(tensors[key].shape) != shape:
            raise AdapterError(
                f"Tensor {key!r}: {WEIGHTS_NAME} holds shape {tuple(tensors[key].shape)}, but "
                f"this base model's module has {shape}: load it on the base model it was "
                "trained with."
            )


def load_adapter(base_model: nn.Module, path: str | Path, is_trainable: bool = False) -> nn.Module:
    """Put the adapter saved in ``path`` on ``base_model`` (in place) and return it.

    Everything is checked before ``base_model`` is touched: the config, the tensor file (damage,
    missing or extra tensors, shapes against the recorded ranks) and the base model's module
    shapes. With ``is_trainable=False`` the model is put in eval mode with every parameter frozen;
    with ``True`` the factors and ``modules_to_save`` stay trainable, for a GeoLoRAOptimizer.
    """
    path = Path(path)
    if geolora_layers(base_model):
        raise ValueError(
            "base_model already has GeoLoRA adapters: load onto a fresh base model (or use "
            "merge_and_unload first)."
        )
    _recover(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory: load_adapter reads the directory written by save_adapter."
        )
    meta, config = _read_config(path)
    tensors, digest = _read_tensors(path)
    _validate(base_model, path, meta, config, tensors)
    if digest != meta["weights_sha256"]:
        raise AdapterError(
            f"{path / WEIGHTS_NAME} is corrupt: its SHA-256 differs from the one recorded in "
            f"{CONFIG_NAME}. Restore it from a copy or save again."
        )
    model = get_geolora_model(base_model, config)
    for name, layer in geolora_layers(model).items():
        kw = {"device": layer.U.device, "dtype": layer.U.dtype}
        u, s, v = (tensors[f"{name}.{part}"].to(**kw) for part in "USV")
        layer.set_factors(u, s, v)
    for name in saved_module_names(model, config):
        module = model.get_submodule(name)
        module.load_state_dict({key: tensors[f"{name}.{key}"] for key in module.state_dict()})
    if not is_trainable:
        model.eval()
        model.requires_grad_(False)
    return model
