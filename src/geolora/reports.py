"""Rank reports: a printable table, a JSON history of ranks over steps, and two PNG plots.

Parameters are counted as in :func:`geolora.rank_report`: an adapter of rank ``r`` on an
``n × m`` weight costs ``r (n + m) + r`` (``S`` diagonal between steps, spec §5).

Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from .model import adapter_param_count, geolora_layers, rank_report

__all__ = [
    "RankHistory",
    "format_rank_table",
    "plot_rank_heatmap",
    "plot_rank_history",
    "write_rank_report",
]

_OTHER = ("\uffff", 0)  # row key of modules without a layer index; sorts after every stack


def _full_report(model: nn.Module) -> dict[str, Any]:
    """:func:`geolora.rank_report` plus ``"params"``: per-module adapter parameters."""
    report = rank_report(model)
    report["params"] = {
        name: adapter_param_count(layer) for name, layer in geolora_layers(model).items()
    }
    return report


def format_rank_table(model_or_report: nn.Module | dict[str, Any]) -> str:
    """A plain-text table of every adapter: module, rank, r_max, params, then the totals.

    Accepts a GeoLoRA model or a report dict as returned by :func:`geolora.rank_report` (the
    params column needs a ``"params"`` map, which reports written by :func:`write_rank_report`
    carry; without it the column shows ``-``).
    """
    if isinstance(model_or_report, nn.Module):
        report = _full_report(model_or_report)
    elif isinstance(model_or_report, dict) and "ranks" in model_or_report:
        report = model_or_report
    else:
        raise TypeError(
            "format_rank_table needs a GeoLoRA model or the dict rank_report(model) returns, "
            f"got {type(model_or_report).__name__}."
        )
    ranks, r_max = report["ranks"], report.get("r_max", {})
    params = report.get("params", {})
    rows = [
        (name, str(rank), str(r_max.get(name, "-")), str(params.get(name, "-")))
        for name, rank in ranks.items()
    ]
    total_params = sum(params.values()) if params else report.get("adapter_params", "-")
    rows.append(("total", str(sum(ranks.values())), str(sum(r_max.values())), str(total_params)))
    header = ("module", "rank", "r_max", "params")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(row: tuple[str, ...]) -> str:
        first = row[0].ljust(widths[0])
        return "  ".join([first, *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))])

    rule = "-" * len(line(header))
    out = [line(header), rule, *(line(row) for row in rows[:-1]), rule, line(rows[-1])]
    if "trainable_params" in report and "total_params" in report:
        out.append(
            f"trainable params: {report['trainable_params']:,} of {report['total_params']:,} "
            f"({100 * report['trainable_params'] / max(report['total_params'], 1):.3f}%)"
        )
    return "\n".join(out)


class RankHistory:
    """Per-module ranks, total rank and trainable parameters recorded over optimizer steps."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.total_rank: list[int] = []
        self.trainable_params: list[int] = []
        self.ranks: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.steps)

    def record(self, step: int, model: nn.Module) -> None:
        """Append the model's current ranks at ``step`` (steps must increase)."""
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"RankHistory steps must increase: got {step} after {self.steps[-1]}.")
        report = rank_report(model)
        if self.ranks and set(report["ranks"]) != set(self.ranks):
            raise ValueError(
                "The model's adapters differ from the ones recorded so far; use one RankHistory "
                "per model."
            )
        if not report["ranks"]:
            raise ValueError("The model has no GeoLoRA adapters to record.")
        self.steps.append(int(step))
        self.total_rank.append(report["total_rank"])
        self.trainable_params.append(report["trainable_params"])
        for name, rank in report["ranks"].items():
            self.ranks.setdefault(name, []).append(rank)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "total_rank": self.total_rank,
            "trainable_params": self.trainable_params,
            "ranks": self.ranks,
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RankHistory:
        data = json.loads(Path(path).read_text())
        history = cls()
        try:
            history.steps = [int(s) for s in data["steps"]]
            history.total_rank = [int(r) for r in data["total_rank"]]
            history.trainable_params = [int(p) for p in data["trainable_params"]]
            history.ranks = {name: [int(r) for r in rs] for name, rs in data["ranks"].items()}
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} is not a RankHistory JSON file ({err!r}).") from err
        lengths = {len(history.total_rank), len(history.trainable_params)}
        lengths |= {len(rs) for rs in history.ranks.values()}
        if lengths != {len(history.steps)}:
            raise ValueError(f"{path}: the recorded series have different lengths.")
        return history


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[float]]]:
    """Rows (``stack.index`` of modules with a layer index, sorted, then ``other``), columns
    (the module type after the index, or the full name, in model order) and the rank in each
    cell (NaN if none)."""
    cells: dict[tuple[tuple[str, int], str], int] = {}
    for name, rank in ranks.items():
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        if at is None:
            cells[(_OTHER, name)] = rank
        else:
            row = (".".join(parts[:at]), int(parts[at]))
            cells[(row, ".".join(parts[at + 1 :]))] = rank
    row_keys = sorted({row for row, _ in cells})
    indexed = dict.fromkeys(col for row, col in cells if row != _OTHER)
    col_keys = [*indexed, *(col for row, col in cells if row == _OTHER and col not in indexed)]
    stacks = {row[0] for row in row_keys if row != _OTHER}
    labels = [
        "other"
        if row == _OTHER
        else (str(row[1]) if len(stacks) == 1 else f"{row[0]}.{row[1]}".lstrip("."))
        for row in row_keys
    ]
    grid = [[float(cells.get((row, col), math.nan)) for col in col_keys] for row in row_keys]
    return labels, col_keys, grid


def plot_rank_heatmap(
    ranks: dict[str, int], path: str | os.PathLike, title: str = "GeoLoRA ranks"
) -> Path:
    """Save a PNG heat map of ``ranks``: rows are layer indices (parsed from names such as
    ``bert.encoder.layer.3.attention.self.query``), columns are module types; modules without a
    layer index go to a final ``other`` row. Each cell shows its rank."""
    if not ranks:
        raise ValueError("plot_rank_heatmap got no ranks (the model has no GeoLoRA adapters?).")
    import numpy as np

    rows, cols, grid = _rank_grid(ranks)
    values = np.ma.masked_invalid(np.array(grid))
    fig = _new_figure(max(4.0, 1.2 * len(cols) + 2.5), max(2.5, 0.35 * len(rows) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(title)
    top = float(values.max())
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                color = "black" if value > 0.6 * top else "white"
                ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def plot_rank_history(history: RankHistory, path: str | os.PathLike) -> Path:
    """Save a PNG with the total rank over optimizer steps (top) and every module's rank
    (bottom; a legend when there are at most 12 modules)."""
    if not len(history):
        raise ValueError("plot_rank_history got an empty RankHistory: record some steps first.")
    fig = _new_figure(8.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(history.steps, history.total_rank, drawstyle="steps-post", color="black")
    top.set_ylabel("total rank")
    top.set_title("GeoLoRA ranks over training")
    many = len(history.ranks) > 12
    for name, series in history.ranks.items():
        bottom.plot(
            history.steps,
            series,
            drawstyle="steps-post",
            linewidth=0.8 if many else 1.2,
            alpha=0.6 if many else 1.0,
            label=None if many else name,
        )
    if not many:
        bottom.legend(fontsize=6, loc="best")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("rank per module")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def write_rank_report(
    model: nn.Module, history: RankHistory | None, out_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write ``rank_report.json`` (the rank report plus per-module params), ``rank_heatmap.png``
    and, given a non-empty history, ``rank_history.json`` and ``rank_history.png`` into
    ``out_dir``. Returns the paths by kind: ``report``, ``heatmap``, ``history``,
    ``history_plot``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = _full_report(model)
    paths = {"report": out / "rank_report.json"}
    paths["report"].write_text(json.dumps(report, indent=1))
    paths["heatmap"] = plot_rank_heatmap(report["ranks"], out / "rank_heatmap.png")
    if history is not None and len(history):
        paths["history"] = history.to_json(out / "rank_history.json")
        paths["history_plot"] = plot_rank_history(history, out / "rank_history.png")
    return paths
