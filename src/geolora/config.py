"""GeoLoRAConfig: which layers get adapters and how their ranks may move.

Field names follow peft's ``LoraConfig`` where the meaning is the same (``r`` is the initial
rank, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``modules_to_save``, ``use_rslora``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .optim.rank_rules import TRUNCATION_MODES

__all__ = ["GeoLoRAConfig"]

TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
BUDGET_UNITS = ("rank", "params")


@dataclass
class GeoLoRAConfig:
    """Configuration of a GeoLoRA model.

    Args:
        target_modules: module names to adapt: a list of names matched as suffixes of the full
            module name (as in peft), one regular expression (full match), or ``"all-linear"``.
        r: initial rank of every adapter.
        r_max: largest rank an adapter may reach (also capped at ``min(n, m)`` per layer).
        r_min: smallest rank an adapter may shrink to (at least 1, so a layer can always grow).
        tau: relative truncation tolerance ``τ ∈ [0, 1)``: the singular values dropped at each step
            have joint norm at most ``τ`` times the norm of all of them.
        rank_margin: growth margin ``ρ``: each layer keeps ``⌈ρ·r_τ⌉`` singular triplets beyond
            the ``r_τ`` that ``τ`` asks for, so that new directions can build up over steps
            (docs/algorithm.md §8; 0 disables growth once the leading directions are fitted).
        shrinkage: ``μ``: each step soft-thresholds the singular values of ``Ŝ``,
            ``σ ← max(σ − μ‖ΔŜ‖₂, 0)`` with ``ΔŜ`` the step's own part of ``Ŝ``, so that
            directions the gradient does not keep feeding decay to zero and the final ranks do
            not depend on the initial rank (docs/algorithm.md §8; 0 gives the paper's step).
        truncation: ``"local"`` (τ per layer, the paper's default) or ``"global"`` (one τ over the
            singular values of all layers).
        budget: if set, an exact global budget replaces ``τ``: keep the largest singular values
            network-wide whose total cost fits; ``budget_unit`` says what is counted.
        budget_unit: ``"rank"`` (each kept value costs 1) or ``"params"`` (``n + m + 1``).
        lora_alpha: ``None`` (the default) gives the adapter scale ``s = 1``, whatever ``r``;
            a number gives peft's ``s = lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``),
            which makes the effective learning rate depend on the initial rank. Fixed at
            injection: later rank changes never rescale the adapter.
        lora_dropout: dropout on the adapter's input.
        modules_to_save: modules trained in full (for example a classifier head).
        exclude_modules: names (suffix match) never adapted, even if ``target_modules`` matches.
        warmup_steps: no truncation (beyond ``r_max``) during the first steps.
        freeze_ranks_after: after this many steps, ranks stay fixed (the bases still move).
        task_type: peft's task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``, … or a ``peft.TaskType``),
            recorded in peft exports so that ``AutoPeftModelFor<Task>`` loads them; default: read
            off the model's class name at export.

    Each field's ``metadata["help"]`` is the one-line help of the ``geolora finetune`` flag and
    config-file key of the same name (:mod:`geolora.app.options`).
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "module names (suffix match), one regex, or 'all-linear'"},
    )
    r: int = field(default=8, metadata={"help": "initial rank of every adapter"})
    r_max: int = field(default=32, metadata={"help": "largest rank an adapter may reach"})
    r_min: int = field(default=1, metadata={"help": "smallest rank an adapter may shrink to"})
    tau: float = field(default=0.1, metadata={"help": "relative truncation tolerance per step"})
    rank_margin: float = field(
        default=0.1,
        metadata={"help": "growth margin: keep ceil(rho * r_tau) triplets beyond what tau keeps"},
    )
    shrinkage: float = field(
        default=0.01,
        metadata={
            "help": "each step lowers every singular value by shrinkage x the step's largest one"
        },
    )
    truncation: Literal["local", "global"] = field(
        default="local", metadata={"help": "tau per layer (local) or over all layers (global)"}
    )
    budget: int | None = field(
        default=None, metadata={"help": "exact global budget on the total cost (replaces tau)"}
    )
    budget_unit: Literal["rank", "params"] = field(
        default="rank", metadata={"help": "what the budget counts"}
    )
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "unset: adapter scale s = 1 for every r; set: peft's lora_alpha / r"},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    use_rslora: bool = field(
        default=False, metadata={"help": "scale lora_alpha / sqrt(r) instead of / r"}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules trained in full (default: the task's head)"}
    )
    exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "module names never adapted"}
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "no truncation below r_max during the first steps"}
    )
    freeze_ranks_after: int | None = field(
        default=None, metadata={"help": "ranks stay fixed after this many steps"}
    )
    task_type: str | None = field(
        default=None,
        metadata={"help": "peft task type recorded in exports (default: from the model class)"},
    )
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
            if self.task_type not in TASK_TYPES:
                raise ValueError(
                    f"task_type must be one of {TASK_TYPES} (peft's TaskType) or None, got "
                    f"{self.task_type!r}."
                )
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if self.target_modules is None or (
            not isinstance(self.target_modules, str) and len(self.target_modules) == 0
        ):
            raise ValueError(
                "GeoLoRAConfig needs target_modules: names such as ['query', 'value'], "
                "a regex, or 'all-linear'."
            )
        for name in ("r", "r_max", "r_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.r > self.r_max:
            raise ValueError(
                f"r={self.r} is larger than r_max={self.r_max}: raise r_max or lower r."
            )
        if self.r_min > self.r:
            raise ValueError(f"r_min={self.r_min} is larger than r={self.r}: lower r_min.")
        if not (isinstance(self.tau, (int, float)) and 0.0 <= self.tau < 1.0):
            raise ValueError(f"tau must lie in [0, 1), got {self.tau!r}; the paper uses 0.05-0.3.")
        if not (isinstance(self.rank_margin, (int, float)) and 0.0 <= self.rank_margin <= 1.0):
            raise ValueError(f"rank_margin must lie in [0, 1], got {self.rank_margin!r}.")
        if not (isinstance(self.shrinkage, (int, float)) and 0.0 <= self.shrinkage < 1.0):
            raise ValueError(f"shrinkage must lie in [0, 1), got {self.shrinkage!r}.")
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(
                f"truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}."
            )
        if self.budget_unit not in BUDGET_UNITS:
            raise ValueError(
                f"budget_unit must be one of {BUDGET_UNITS}, got {self.budget_unit!r}."
            )
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ValueError(f"budget must be a positive integer or None, got {self.budget!r}.")
        if self.lora_alpha is not None and not (
            isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0
        ):
            raise ValueError(
                f"lora_alpha must be a positive number or None, got {self.lora_alpha!r}."
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}.")
        if self.freeze_ranks_after is not None and self.freeze_ranks_after < self.warmup_steps:
            raise ValueError("freeze_ranks_after must not come before warmup_steps ends.")

    @property
    def scale(self) -> float:
        """The fixed adapter scale ``s``."""
        if self.lora_alpha is None:
            return 1.0
        denominator = math.sqrt(self.r) if self.use_rslora else self.r
        return self.lora_alpha / denominator

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeoLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown GeoLoRAConfig keys {unknown}; known keys: {sorted(known)}.")
        return cls(**data)
