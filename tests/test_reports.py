"""Rank reports: table, JSON history, heat map and history plot."""

from __future__ import annotations

import json

import pytest
import torch
from matplotlib.image import imread

from geolora import GeoLoRAConfig, get_geolora_model, rank_report
from geolora.model import geolora_layers
from geolora.reports import (
    RankHistory,
    format_rank_table,
    plot_rank_heatmap,
    plot_rank_history,
    write_rank_report,
)


@pytest.fixture
def model(tiny_bert):
    cfg = GeoLoRAConfig(target_modules=["query", "value"], r=2, r_max=8)
    model = get_geolora_model(tiny_bert, cfg)
    layers = geolora_layers(model)
    for i, layer in enumerate(layers.values()):  # distinct ranks 1..4
        r = i + 1
        layer.set_factors(layer.U[:, :r].detach(), torch.ones(r), layer.V[:, :r].detach())
    return model


def test_table_lists_every_module_with_rank_rmax_params_and_totals(model):
    table = format_rank_table(model)
    lines = table.splitlines()
    for name, layer in geolora_layers(model).items():
        row = next(line for line in lines if line.startswith(name + " "))
        r = layer.current_rank
        assert row.split()[1:] == [str(r), "8", str(r * (32 + 32) + r)]
    total = next(line for line in lines if line.startswith("total"))
    assert total.split()[1:] == ["10", "32", str(10 * 65)]
    report = rank_report(model)
    assert f"{report['trainable_params']:,}" in table
    # a report dict without per-module params still formats, with '-' in the params column
    assert format_rank_table(report).splitlines()[2].split()[-1] == "-"
    with pytest.raises(TypeError, match="rank_report"):
        format_rank_table([1, 2])


def test_history_records_and_round_trips_json(model, tmp_path):
    history = RankHistory()
    history.record(0, model)
    first = next(iter(geolora_layers(model).values()))
    first.set_factors(first.U[:, :3].detach(), torch.ones(3), first.V[:, :3].detach())
    history.record(5, model)
    assert history.steps == [0, 5]
    assert history.total_rank == [10, 12]
    name = next(iter(geolora_layers(model)))
    assert history.ranks[name] == [1, 3]
    loaded = RankHistory.from_json(history.to_json(tmp_path / "h.json"))
    assert loaded.to_dict() == history.to_dict()
    with pytest.raises(ValueError, match="increase"):
        history.record(5, model)


def test_history_rejects_foreign_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"steps": [0, 1], "total_rank": [1], "trainable_params": [1]}))
    with pytest.raises(ValueError, match="RankHistory"):
        RankHistory.from_json(path)
    path.write_text(
        json.dumps({"steps": [0, 1], "total_rank": [1], "trainable_params": [1, 2], "ranks": {}})
    )
    with pytest.raises(ValueError, match="lengths"):
        RankHistory.from_json(path)


def test_heatmap_grid_rows_are_layers_and_columns_module_types(tmp_path):
    from geolora.reports import _rank_grid

    ranks = {
        "bert.encoder.layer.0.attention.self.query": 3,
        "bert.encoder.layer.1.attention.self.query": 5,
        "bert.encoder.layer.1.attention.self.value": 7,
        "classifier": 2,
    }
    rows, cols, grid = _rank_grid(ranks)
    assert rows == ["0", "1", "other"]
    assert cols == ["attention.self.query", "attention.self.value", "classifier"]
    assert grid[1][:2] == [5.0, 7.0] and grid[0][0] == 3.0 and grid[2][2] == 2.0
    assert grid[0][1] != grid[0][1]  # NaN: no such module
    image = imread(plot_rank_heatmap(ranks, tmp_path / "h.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_heatmap_without_layer_indices(tmp_path):
    path = plot_rank_heatmap({"fc1": 4, "fc2": 1}, tmp_path / "flat.png")
    assert imread(path).shape[2] in (3, 4)
    with pytest.raises(ValueError, match="no ranks"):
        plot_rank_heatmap({}, tmp_path / "empty.png")


def test_write_rank_report_writes_valid_files(model, tmp_path):
    history = RankHistory()
    for step in range(3):
        history.record(step, model)
    paths = write_rank_report(model, history, tmp_path / "out")
    assert {p.name for p in paths.values()} == {
        "rank_report.json",
        "rank_history.json",
        "rank_heatmap.png",
        "rank_history.png",
    }
    report = json.loads(paths["report"].read_text())
    assert report["ranks"] == rank_report(model)["ranks"]
    assert sum(report["params"].values()) == report["adapter_params"]
    assert format_rank_table(report) == format_rank_table(model)
    assert RankHistory.from_json(paths["history"]).to_dict() == history.to_dict()
    for key in ("heatmap", "history_plot"):
        image = imread(paths[key])
        assert image.ndim == 3 and min(image.shape[:2]) > 100
        assert image[..., :3].std() > 0.01  # not a blank canvas
    assert set(write_rank_report(model, None, tmp_path / "no_history")) == {"report", "heatmap"}


def test_history_plot_needs_records(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_rank_history(RankHistory(), tmp_path / "x.png")
