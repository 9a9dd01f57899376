"""The methods the benchmarks compare, attached to a model the same way for every table.

* ``geolora``: :class:`geolora.GeoLoRAOptimizer` on GeoLoRA adapters. Only the options a run
  names are passed (to :class:`geolora.GeoLoRAConfig` if it has a field of that name, otherwise
  to the optimizer), so every other setting is the library's default; the cache key of a GeoLoRA
  run carries :func:`geolora_fingerprint`, so a change of the library retrains it.
* ``lora``, ``adalora``: peft's ``LoraConfig`` / ``AdaLoraConfig`` with AdamW (AdaLoRA calls
  ``update_and_allocate(step)`` after each ``optimizer.step()``, before ``zero_grad()``);
* ``full``: AdamW on every weight of the trained layers; ``head``: AdamW on the classifier only.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

METHODS = ("geolora", "lora", "adalora", "full", "head")
TARGETS = (
    r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
"""Every linear map of the trained encoder layers (query, key, value, attention output, FFN)."""
DEFAULTS: dict[str, dict[str, Any]] = {
    "geolora": {},  # the library's defaults
    "lora": dict(r=8, lora_alpha=16.0),
    "adalora": dict(init_r=12, target_r=8, lora_alpha=16.0, tinit_frac=0.1, tfinal_frac=0.2),
    "full": {},
    "head": {},
}
PEFT_PREFIX = "base_model.model."


def geolora_fingerprint() -> str:
    """Hash of the installed ``geolora`` package's Python source (part of GeoLoRA cache keys)."""
    import geolora

    root = Path(geolora.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def geolora_defaults() -> dict[str, Any]:
    """The library's default initial rank ``r`` and optimizer ``lr`` (the values a run gets
    when it names neither)."""
    import inspect

    from geolora import GeoLoRAConfig, GeoLoRAOptimizer

    lr = inspect.signature(GeoLoRAOptimizer).parameters["lr"].default
    return {"r": GeoLoRAConfig(target_modules=["query"]).r, "lr": lr}


def classification_loss(out: Any, labels: Tensor) -> Tensor:
    """The loss a classification run reports: cross-entropy of the logits (without AdaLoRA's
    orthogonality penalty, which peft adds to ``out.loss``)."""
    return F.cross_entropy(out.logits.detach(), labels)


@dataclass
class Prepared:
    """A model ready to train with one method: ``train_step`` does forward, backward, step."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    reported_loss: Callable[[Any, Tensor], Tensor] = field(default=classification_loss)

    def train_step(self, batch: dict[str, Tensor], labels: Tensor) -> float:
        out = self.model(**batch, labels=labels)
        loss = self.reported_loss(out, labels)
        out.loss.backward()  # AdaLoRA's includes its orthogonality penalty
        self.optimizer.step()
        if self.method == "adalora":
            self.model.base_model.update_and_allocate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()


def _geolora(
    hyper: dict[str, Any], model: nn.Module, targets: str | list[str], heads: list[str] | None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model

    fields = {f.name for f in dataclasses.fields(GeoLoRAConfig)}
    cfg = GeoLoRAConfig(
        target_modules=targets,
        modules_to_save=heads,
        **{k: v for k, v in hyper.items() if k in fields},
    )
    model = get_geolora_model(model, cfg)
    return model, GeoLoRAOptimizer(model, **{k: v for k, v in hyper.items() if k not in fields})


def prepare(
    method: str,
    hyper: dict[str, Any],
    model: nn.Module,
    total_steps: int,
    targets: str | list[str] = TARGETS,
    heads: list[str] | None = None,
) -> Prepared:
    """Attach ``method`` (with ``hyper`` merged over :data:`DEFAULTS`) to ``model``; ``heads``
    (default ``["classifier"]``; ``[]`` for none) are trained in full by every adapter method."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    heads = ["classifier"] if heads is None else heads
    h = {**DEFAULTS[method], **hyper}
    if method == "geolora":
        model, opt = _geolora(h, model, targets, heads or None)
        return Prepared(method, model, opt)
    if method in ("lora", "adalora"):
        from peft import AdaLoraConfig, LoraConfig, get_peft_model

        shared = dict(
            lora_alpha=h["lora_alpha"],
            target_modules=targets,
            lora_dropout=0.0,
            modules_to_save=heads or None,
        )
        if method == "lora":
            cfg = LoraConfig(r=h["r"], **shared)
        else:
            tinit = max(1, int(h["tinit_frac"] * total_steps))
            tfinal = max(1, int(h["tfinal_frac"] * total_steps))
            if tinit + tfinal >= total_steps:
                tinit, tfinal = 0, 0
            cfg = AdaLoraConfig(
                init_r=h["init_r"],
                target_r=h["target_r"],
                total_step=total_steps,
                tinit=tinit,
                tfinal=tfinal,
                deltaT=1,
                **shared,
            )
        model = get_peft_model(model, cfg)
    elif method == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    return Prepared(method, model, torch.optim.AdamW(params, lr=h["lr"], weight_decay=0.0))


def parameter_counts(prep: Prepared) -> dict[str, Any]:
    """Trainable parameters at the end. GeoLoRA: ``rank_report`` (``r(n+m)+r`` per adapter);
    AdaLoRA: ``allocated`` (all of A, E, B at ``init_r``) and ``effective`` (the unmasked
    triplets, ``r_eff (n+m+1)`` per adapter), each plus the head; others: requires_grad numel."""
    model = prep.model
    if prep.method == "geolora":
        from geolora import rank_report

        rep = rank_report(model)
        return {k: rep[k] for k in ("trainable_params", "adapter_params", "ranks", "total_rank")}
    allocated = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if prep.method != "adalora":
        return {"trainable_params": allocated}
    head = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
    )
    ranks, effective = {}, head
    for name, module in model.named_modules():
        e = getattr(module, "lora_E", None)
        if isinstance(e, nn.ParameterDict) and "default" in e:
            r_eff = int((e["default"] != 0).sum())
            ranks[name.removeprefix(PEFT_PREFIX)] = r_eff
            effective += r_eff * (module.in_features + module.out_features + 1)
    return {
        "trainable_params": effective,
        "allocated_params": allocated,
        "adapter_params": effective - head,
        "ranks": ranks,
        "total_rank": sum(ranks.values()),
    }


@torch.no_grad()
def delta_weights(prep: Prepared) -> dict[str, Tensor]:
    """The weight change ``ΔW`` (out × in, scale included) of every adapted module, by module
    name without peft's ``base_model.model.`` prefix."""
    if prep.method == "geolora":
        from geolora import geolora_layers

        return {n: layer.delta_weight() for n, layer in geolora_layers(prep.model).items()}
    if prep.method not in ("lora", "adalora"):
        raise ValueError(f"{prep.method!r} has no low-rank adapters to read ΔW from.")
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name.removeprefix(PEFT_PREFIX): module.get_delta_weight("default")
        for name, module in prep.model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }
