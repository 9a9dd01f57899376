"""The options of ``geolora finetune``, declared once.

Two dataclasses hold every option with its default and one-line help (``metadata["help"]``):
:class:`geolora.GeoLoRAConfig` for the adapters and :class:`FinetuneOptions` for the run. The
command-line flags (``--r-max``), the config-file keys (``r_max`` or ``r-max``) and the Python
options (``FinetuneOptions(lr=..., adapter={"r_max": 16})``) are all derived from these fields by
:func:`option_specs`, so they cannot disagree. Adapter options left unset keep GeoLoRAConfig's
defaults; ``target_modules`` unset means the architecture's default targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import GeoLoRAConfig
from ..optim import base_rules
from ..optim.optimizer import GeoLoRAOptimizer

__all__ = ["RUNTIME_OPTIONS", "TASKS", "FinetuneOptions", "OptionSpec", "option_specs"]

TASKS = ("classification", "causal-lm")
COMPUTE_DTYPES = ("float32", "bfloat16")
# Options that change how a run is carried out, not what it computes: a resumed run may change them.
RUNTIME_OPTIONS = ("output_dir", "threads", "quiet")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class FinetuneOptions:
    """Everything ``geolora finetune`` takes besides the adapter's GeoLoRAConfig fields, which
    go into ``adapter`` (unset ones keep GeoLoRAConfig's defaults)."""

    task: Literal["classification", "causal-lm"] = field(
        default="classification",
        metadata=_help("classification (a sequence classifier) or causal-lm (SFT of a chat LM)"),
    )
    model: str | None = field(
        default=None,
        metadata=_help(
            "Hugging Face model id, local directory or .gguf file (default: all-MiniLM-L6-v2 "
            "for classification, SmolLM2-135M-Instruct for causal-lm)"
        ),
    )
    dataset: str | None = field(
        default=None,
        metadata=_help(
            "CSV/TSV/JSONL/JSON file (or, for classification, a Hugging Face dataset name; "
            "default: the embedded Rotten Tomatoes sentences)"
        ),
    )
    text_column: str = field(default="text", metadata=_help("classification: the text column"))
    text_pair_column: str | None = field(
        default=None, metadata=_help("classification: the second text of a sentence pair")
    )
    label_column: str = field(default="label", metadata=_help("classification: the label column"))
    prompt_column: str = field(default="prompt", metadata=_help("causal-lm: the prompt column"))
    response_column: str = field(
        default="response", metadata=_help("causal-lm: the column with the answer to learn")
    )
    messages_column: str = field(
        default="messages",
        metadata=_help("causal-lm: column of chat messages, used instead of prompt/response"),
    )
    chat_template: bool = field(
        default=True, metadata=_help("causal-lm: render with the tokenizer's chat template")
    )
    adapter: dict[str, Any] = field(
        default_factory=dict, metadata=_help("GeoLoRAConfig fields (flags of their own)")
    )
    base_rule: str | None = field(
        default=None,
        metadata=_help(
            "update rule of the factors (default: GeoLoRAOptimizer's for classification, "
            "riemannian_adam_rows for causal-lm, whose default rule collapses on some seeds: "
            "docs/llm.md)"
        ),
    )
    first_moment_correction: bool = field(
        default=inspect.signature(GeoLoRAOptimizer).parameters["first_moment_correction"].default,
        metadata=_help(
            "divide the factors' first moments by 1 - beta1^t (Adam's bias correction); off, "
            "each adapter's step ramps up over its first steps, which fits worse under this "
            "command's lr schedule (docs/algorithm.md §8)"
        ),
    )
    lr: float | None = field(
        default=None,
        metadata=_help(
            "peak learning rate (default: 1e-3 for classification, 3e-4 for causal-lm, where "
            "1e-3 overshoots in the first steps: docs/llm.md)"
        ),
    )
    weight_decay: float = field(default=0.0, metadata=_help("decoupled weight decay"))
    warmup_ratio: float = field(default=0.1, metadata=_help("share of the steps with warm-up"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0: none)"))
    epochs: int = field(default=2, metadata=_help("passes over the training split"))
    batch_size: int = field(default=32, metadata=_help("examples per step"))
    max_length: int | None = field(
        default=None,
        metadata=_help(
            "tokens per example, longer ones are cut (default: 64 for classification, 512 for "
            "causal-lm)"
        ),
    )
    limit: int | None = field(
        default=None,
        metadata=_help(
            "use at most this many examples (default: all of a file; of the embedded data 6000 "
            "for classification, 1000 for causal-lm)"
        ),
    )
    eval_fraction: float = field(default=0.2, metadata=_help("share held out for evaluation"))
    max_new_tokens: int | None = field(
        default=None,
        metadata=_help(
            "causal-lm: tokens generated per held-out prompt (default: longest answer + 8)"
        ),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute activations in backward (less memory)")
    )
    load_in_4bit: bool = field(
        default=False, metadata=_help("quantize the frozen linear layers to 4-bit NF4")
    )
    compute_dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata=_help("compute dtype of the 4-bit layers")
    )
    save_merged: bool = field(
        default=False, metadata=_help("also write the model with the adapter merged in")
    )
    seed: int = field(default=0, metadata=_help("random seed (data order, init, dropout)"))
    output_dir: str = field(
        default="runs/geolora-finetune", metadata=_help("where adapter, metrics, reports go")
    )
    threads: int | None = field(default=None, metadata=_help("torch CPU threads"))
    quiet: bool = field(default=False, metadata=_help("no progress bar"))

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task (--task) must be one of {TASKS}, got {self.task!r}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}.")
        for name in ("epochs", "batch_size", "max_length", "max_new_tokens", "threads", "limit"):
            value = getattr(self, name)
            if value is None and name not in ("epochs", "batch_size"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} ({flag}) must be a positive integer, got {value!r}.")
        if self.base_rule is not None:
            try:
                base_rules.get_base_rule(self.base_rule)
            except ValueError as err:
                raise ValueError(f"--base-rule: {err}") from None
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr (--lr) must be positive, got {self.lr!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}.")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction!r}.")
        unknown = sorted(set(self.adapter) - set(ADAPTER_FIELDS))
        if unknown:
            raise ValueError(f"unknown adapter options {unknown}; known: {list(ADAPTER_FIELDS)}.")
        self.adapter_config(self.adapter.get("target_modules") or "all-linear")  # validates

    @property
    def model_name(self) -> str:
        from .models import DEFAULT_LLM, DEFAULT_MODEL

        return self.model or (DEFAULT_LLM if self.task == "causal-lm" else DEFAULT_MODEL)

    @property
    def peak_lr(self) -> float:
        return self.lr or (3e-4 if self.task == "causal-lm" else 1e-3)

    @property
    def task_base_rule(self) -> str | None:
        """``base_rule``, else the task's default (``None``: GeoLoRAOptimizer's own)."""
        return self.base_rule or ("riemannian_adam_rows" if self.task == "causal-lm" else None)

    @property
    def token_limit(self) -> int:
        return self.max_length or (512 if self.task == "causal-lm" else 64)

    def adapter_config(self, default_targets: list[str] | str, **extra: Any) -> GeoLoRAConfig:
        """The GeoLoRAConfig of this run: ``adapter`` over GeoLoRAConfig's defaults, with
        ``default_targets`` when ``target_modules`` is unset, and ``extra`` fields."""
        values = {**self.adapter, **extra}
        values["target_modules"] = values.get("target_modules") or default_targets
        return GeoLoRAConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "options") -> FinetuneOptions:
        """Options from flat keys (adapter fields beside run options, ``-`` or ``_``) and/or a
        nested ``adapter`` mapping, as written by :meth:`to_dict`."""
        run, adapter = {}, dict(data.get("adapter") or {})
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name == "adapter":
                continue
            if name in ADAPTER_FIELDS:
                adapter[name] = value
            elif name in RUN_FIELDS:
                run[name] = value
            else:
                known = sorted([*RUN_FIELDS, *ADAPTER_FIELDS])
                raise ValueError(f"{source}: unknown key {key!r}; known keys: {', '.join(known)}.")
        return cls(**run, adapter=adapter)


ADAPTER_FIELDS = {f.name: f for f in dataclasses.fields(GeoLoRAConfig) if f.name != "metadata"}
RUN_FIELDS = {f.name: f for f in dataclasses.fields(FinetuneOptions) if f.name != "adapter"}


# --- flags and config-file keys ------------------------------------------------------------
def _names(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated module names")
    return names


def _targets(value: str) -> list[str] | str:
    return "all-linear" if value.strip() == "all-linear" else _names(value)


def _boolean(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return lowered in ("true", "yes", "1")


@dataclass
class OptionSpec:
    """One option: its name, how a text value is parsed, its help, default and choices."""

    name: str
    parse: Callable[[str], Any]
    help: str
    default: Any
    choices: tuple[str, ...] | None
    in_adapter: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        return self.parse is _boolean

    @property
    def switched_on(self) -> bool:
        """A switch whose default is on: the command line offers ``--no-<name>`` to turn it off."""
        return self.is_switch and bool(self.default)

    @property
    def command_line_flag(self) -> str:
        """The flag ``geolora finetune`` takes: :attr:`flag`, or ``--no-…`` for a switch that
        is on by default."""
        return "--no-" + self.flag[2:] if self.switched_on else self.flag

    def convert(self, value: Any) -> Any:
        """A config-file value as the option's type (text values parsed like flags)."""
        if value is None or (isinstance(value, list) and self.parse in (_names, _targets)):
            return value
        if self.is_switch and isinstance(value, bool):
            return value
        parsed = self.parse(str(value))
        if self.choices and parsed not in self.choices:
            raise argparse.ArgumentTypeError(f"expected one of {list(self.choices)}, got {value!r}")
        return parsed


def _spec(f: dataclasses.Field, hint: Any, in_adapter: bool) -> OptionSpec:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    choices = None
    if f.name == "target_modules":
        parse: Callable[[str], Any] = _targets
    elif typing.get_origin(args[0]) is list:
        parse = _names
    elif typing.get_origin(args[0]) is Literal:
        parse, choices = str, typing.get_args(args[0])
    else:
        parse = {bool: _boolean, int: int, float: float}.get(args[0], str)
    default = f.default if f.default is not dataclasses.MISSING else None
    return OptionSpec(f.name, parse, f.metadata.get("help", ""), default, choices, in_adapter)


def option_specs() -> list[OptionSpec]:
    """Every option of ``geolora finetune``: the run options, then the adapter's."""
    run_hints = typing.get_type_hints(FinetuneOptions)
    adapter_hints = typing.get_type_hints(GeoLoRAConfig)
    return [_spec(f, run_hints[f.name], False) for f in RUN_FIELDS.values()] + [
        _spec(f, adapter_hints[f.name], True) for f in ADAPTER_FIELDS.values()
    ]
