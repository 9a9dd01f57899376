"""Shared runner of the text benchmarks: all-MiniLM-L6-v2 on the Rotten Tomatoes sentences.

One function, :func:`run`, trains one method (:mod:`methods`) with one set of hyper-parameters
for a fixed number of steps and returns (and caches, keyed by its full configuration: see
:func:`cached`) a result dict. Training runs the top ``top_layers`` encoder layers, the pooler and
the classifier on cached hidden states (:mod:`minilm`). Adapters go on every linear map of those
layers (query, key, value, attention output, both FFN maps). The learning rate is constant, the
loss is cross-entropy; runs whose loss turns non-finite (or whose GeoLoRA step refuses non-finite
gradients) stop and are reported as diverged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from methods import DEFAULTS, Prepared, geolora_fingerprint, parameter_counts, prepare
from minilm import FULL, SMOKE, THREADS, Setup, features, top_model
from torch import Tensor, nn

from geolora.app.finetune import learning_rate_at

RESULTS = Path(__file__).resolve().parent / "results"
VERSION = 2
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
FIRST_LOSSES = 30  # per-step losses kept from the start of a run (the curve keeps every 10th)
FULL_LR_GRID = (3e-5, 1e-4, 3e-4)
HEAD_LR_GRID = (1e-3, 3e-3, 1e-2)
SCHEDULE_OPTIONS = ("lr_warmup", "lr_decay")  # run options of schedule_lr_as_asked


def take_batch(split: dict[str, Tensor], idx: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Rows ``idx`` of a split, trimmed to their longest sentence (per-token labels too)."""
    mask = split["mask"][idx]
    length = int(mask.sum(1).max())
    labels = split["labels"][idx]
    if labels.dim() > 1:
        labels = labels[:, :length]
    return {
        "inputs_embeds": split["hidden"][idx, :length],
        "attention_mask": mask[:, :length],
    }, labels


@torch.no_grad()
def accuracy(model: nn.Module, split: dict[str, Tensor], batch_size: int = 128) -> float:
    """Share of correctly classified sentences (model in eval mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    n = len(split["labels"])
    for i in range(0, n, batch_size):
        batch, labels = take_batch(split, torch.arange(i, min(n, i + batch_size)))
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / n


def config_key(method: str, hyper: dict[str, Any], setup: Any) -> tuple[dict[str, Any], str]:
    """The full configuration of a run and its short hash (the cache key). ``setup`` is a
    dataclass; a GeoLoRA run's key also holds the library's source fingerprint."""
    config = {
        "version": VERSION,
        "method": method,
        "hyper": {**DEFAULTS[method], **hyper},
        "setup": dataclasses.asdict(setup),
    }
    if method == "geolora":
        config["code"] = geolora_fingerprint()
    text = json.dumps(config, sort_keys=True)
    return config, hashlib.sha1(text.encode()).hexdigest()[:16]


def cached(
    method: str,
    hyper: dict[str, Any],
    setup: Any,
    results_dir: Path,
    compute: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """``compute()``'s result for this configuration, stored once as
    ``<results_dir>/runs/<method>-<hash>.json`` (with ``config`` and ``key`` added) and read back
    on every later call, so an interrupted suite resumes where it stopped."""
    config, key = config_key(method, hyper, setup)
    path = Path(results_dir) / "runs" / f"{method}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = {"config": config, "key": key, **compute()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def batch_order(n_train: int, batch_size: int, steps: int, seed: int) -> Iterator[Tensor]:
    """The row indices of ``steps`` batches of ``batch_size`` out of ``n_train`` rows: seeded
    permutations, reshuffled each time fewer than ``batch_size`` rows are left."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n_train, generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def train(
    prep: Prepared, split: dict[str, Tensor], steps: int, batch_size: int, seed: int
) -> dict[str, Any]:
    """``steps`` training steps on batches drawn from ``split`` (reshuffled each epoch, seeded);
    stops at the first non-finite loss (or a GeoLoRA step that refuses non-finite gradients)."""
    losses: list[float] = []
    diverged_at = None
    start = time.perf_counter()
    for step, idx in enumerate(batch_order(len(split["labels"]), batch_size, steps, seed)):
        batch, labels = take_batch(split, idx)
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
    return {
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "loss_curve": losses[::10],
        "first_losses": losses[:FIRST_LOSSES],
        "diverged": diverged_at is not None,
        "diverged_at": diverged_at,
        "train_s": train_s,
        "step_s": train_s / max(1, len(losses)),
    }


def linear_warmup(
    optimizer: torch.optim.Optimizer, steps: int, decay_until: int | None = None
) -> None:
    """Scale the lr by ``min(1, (t + 1) / steps)`` at step ``t`` (a linear warm-up), or, with
    ``decay_until = T``, by the ``geolora finetune`` schedule (warm-up, then linear decay to 0 at
    ``T``; :func:`geolora.app.finetune.learning_rate_at`). Done by
    ``torch.optim.lr_scheduler.LambdaLR``, stepped after every ``optimizer.step()``."""

    def factor(t: int) -> float:
        if decay_until is None:
            return min(1.0, (t + 1) / steps)
        return learning_rate_at(t, decay_until, 1.0, steps)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    optimizer.register_step_post_hook(lambda *_: schedule.step())


def schedule_lr_as_asked(
    optimizer: torch.optim.Optimizer, hyper: dict[str, Any], total_steps: int | None = None
) -> None:
    """The run options of the lr schedule (not method options: callers leave them out of what
    they pass to ``prepare``): :func:`linear_warmup` over ``hyper["lr_warmup"]`` steps if that
    key is set, and with ``hyper["lr_decay"]`` true the linear decay to 0 at ``total_steps``
    after it (the schedule ``geolora finetune`` and transformers' Trainer use)."""
    if hyper.get("lr_decay"):
        if total_steps is None:
            raise ValueError("lr_decay needs the run's total_steps.")
        linear_warmup(optimizer, hyper.get("lr_warmup", 0), decay_until=total_steps)
    elif hyper.get("lr_warmup"):
        linear_warmup(optimizer, hyper["lr_warmup"])


def run(
    method: str, hyper: dict[str, Any], setup: Setup = FULL, results_dir: Path = RESULTS
) -> dict[str, Any]:
    """Train ``method`` with ``hyper`` (needs ``lr``; ``seed`` defaults to 0; ``lr_warmup``:
    steps of :func:`linear_warmup`, none if absent) and return its result; cached by
    :func:`cached`."""
    if "lr" not in hyper:
        raise ValueError("hyper needs a learning rate 'lr'.")
    hyper = {"seed": 0, **hyper}

    def compute() -> dict[str, Any]:
        torch.set_num_threads(THREADS)
        data = features(setup)
        seed = hyper["seed"]
        model = top_model(setup.top_layers, seed)
        torch.manual_seed(seed)
        fit = {k: v for k, v in hyper.items() if k not in ("seed", *SCHEDULE_OPTIONS)}
        prep = prepare(method, fit, model, setup.steps)
        schedule_lr_as_asked(prep.optimizer, hyper, setup.steps)
        prep.model.train()
        trained = train(prep, data["train"], setup.steps, setup.batch_size, seed)
        return {
            "val_acc": accuracy(prep.model, data["val"]),
            "test_acc": accuracy(prep.model, data["test"]),
            **trained,
            **parameter_counts(prep),
        }

    return cached(method, hyper, setup, results_dir, compute)


def best_lr(
    method: str,
    hyper: dict[str, Any],
    grid: tuple[float, ...],
    setup: Setup = FULL,
    results_dir: Path = RESULTS,
    seeds: tuple[int, ...] = (0,),
) -> tuple[float, list[dict[str, Any]]]:
    """Run ``method`` at every lr of ``grid`` with every one of ``seeds`` and return the lr with
    the best validation accuracy averaged over the seeds, among the lrs at which no seed
    diverged (all lrs if every one did), with all the runs."""
    runs = [
        run(method, {**hyper, "lr": lr, "seed": seed}, setup, results_dir)
        for lr in grid
        for seed in seeds
    ]
    ok = [lr for lr in grid if not any(r["diverged"] for r in runs if _lr(r) == lr)] or list(grid)
    means = mean_acc_by_lr([r for r in runs if _lr(r) in ok])
    return max(means, key=means.__getitem__), runs


def _lr(run_result: dict[str, Any]) -> float:
    return run_result["config"]["hyper"]["lr"]


def mean_acc_by_lr(
    runs: list[dict[str, Any]],
    split: str = "val",
    lr_of: Callable[[dict[str, Any]], float] = _lr,
) -> dict[float, float]:
    """Accuracy on ``split`` (``"val"`` or ``"test"``) of runs averaged over their seeds, per lr
    (in the order the lrs first appear); ``lr_of`` reads a run's lr (by default that of a
    :func:`run` result)."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        by_lr.setdefault(lr_of(r), []).append(r[f"{split}_acc"])
    return {lr: statistics.fmean(accs) for lr, accs in by_lr.items()}


def command(name: str, smoke: bool, extras: str = "") -> str:
    """The shell command that produces table ``name`` (``extras``: further options)."""
    line = f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/{name}.py" + (" --smoke" if smoke else "")
    return f"{line} {extras}" if extras else line


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


def publish(name: str, title: str, lines: list[str], payload: dict[str, Any], args: Any) -> Path:
    """:func:`write_table` under ``args.out`` with the command that reproduces this run (the
    script ``name`` with the options of ``args``, from :func:`parse_args`)."""
    cmd = command(name, args.smoke, args.extras)
    return write_table(name, cmd, title, lines, payload, args.out)


def schedule_words(schedule: dict[str, Any] | None) -> str:
    """The lr schedule of the run options ``schedule`` (see :func:`schedule_lr_as_asked`) in
    words."""
    schedule = schedule or {}
    warmup = schedule.get("lr_warmup")
    words = f"lr warm-up over {warmup} steps" if warmup else ""
    if schedule.get("lr_decay"):
        return f"{words}, then linear lr decay to 0" if words else "linear lr decay to 0"
    return f"{words}, then constant lr" if words else "constant lr"


def setup_note(setup: Setup, schedule: dict[str, Any] | None = None) -> str:
    """One line describing the run size and lr ``schedule`` (run options), for the tables."""
    trained = (
        "all 6 encoder layers trained (embedding outputs cached)"
        if setup.top_layers == 6
        else f"top {setup.top_layers} encoder layer(s) trained (lower layers frozen and cached)"
    )
    return (
        f"all-MiniLM-L6-v2, Rotten Tomatoes: {setup.n_train} train / {setup.n_val} val / "
        f"{setup.n_test} test sentences, max_length {setup.max_length}, batch {setup.batch_size}, "
        f"{setup.steps} steps, {schedule_words(schedule)}, AdamW for peft/full/head; {trained}, "
        "adapters on "
        f"all {6 * setup.top_layers} linear maps of the trained layers; lr picked on val "
        f"accuracy, test accuracy reported; {THREADS} CPU thread."
    )


def parse_args(
    description: str,
    argv: list[str] | None = None,
    methods: tuple[str, ...] = (),
    add_options: Callable[[Any], None] | None = None,
    schedule: bool = False,
):
    """``--smoke`` (a few steps, tiny grids) and ``--out`` (results folder); with ``methods``,
    also ``--methods`` (a subset of them to run; the tables then hold only those); with
    ``schedule``, ``--warmup N`` and ``--decay`` (the lr schedule of every run, as the run
    options ``args.schedule`` of :func:`schedule_lr_as_asked`); ``add_options(parser)`` adds a
    script's own options. ``args.extras`` spells every option that differs from its default
    except ``--smoke`` (for the table's command line)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny grids (CI)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    if methods:
        parser.add_argument(
            "--methods", nargs="+", choices=methods, default=list(methods), help="run only these"
        )
    if schedule:
        parser.add_argument("--warmup", type=int, default=0, help="lr warm-up steps (0: none)")
        parser.add_argument(
            "--decay", action="store_true", help="then a linear lr decay to 0 at the last step"
        )
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args(argv)
    if schedule:
        args.schedule = {
            **({"lr_warmup": args.warmup} if args.warmup else {}),
            **({"lr_decay": True} if args.decay else {}),
        }
    args.setup = SMOKE if args.smoke else FULL
    extras = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest in ("help", "smoke"):
            continue
        if action.dest == "out":
            value, default = value.resolve(), Path(action.default).resolve()
            root = RESULTS.parents[1]
            if value != default:
                extras += [
                    "--out",
                    str(value.relative_to(root) if value.is_relative_to(root) else value),
                ]
        elif value != action.default and action.nargs == 0:  # a flag such as --decay
            extras.append(action.option_strings[0])
        elif value != action.default:
            values = value if isinstance(value, list) else [value]
            extras += [action.option_strings[0], *(shlex.quote(str(v)) for v in values)]
    args.extras = " ".join(extras)
    return args


def fmt_acc(values: list[float]) -> str:
    """``mean ± std`` in percent (std over seeds, n−1)."""
    t = torch.tensor(values, dtype=torch.float64) * 100
    if len(values) == 1:
        return f"{float(t[0]):.1f}"
    return f"{float(t.mean()):.1f} ± {float(t.std()):.1f}"
