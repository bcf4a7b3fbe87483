"""`fashion-mnist`: the IDX files of the Debian package dataset-fashion-mnist (or any folder holding them).
Its t10k test set is the `val` split."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from featurestore.errors import DatasetError, one_line

from .base import ArrayImageDataset, DatasetReader, first_per_class

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Split name -> IDX file prefix of the Debian package dataset-fashion-mnist.
_FASHION_MNIST_PREFIX = {"train": "train", "val": "t10k"}

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip-compressed if the name ends in .gz) into a native-endian numpy array.

    Format: 2 zero bytes, a dtype code, the number of dimensions n, n big-endian uint32 sizes, then the
    data in C order. Anything else (bad magic, wrong length) raises DatasetError.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {one_line(exc, with_type=False)} "
                           f"(reinstall or re-download it)") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number): reinstall or re-download it")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated (incomplete IDX header): reinstall or re-download it")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path} holds {len(data) - header} data bytes but its header {tuple(shape)} "
                           f"needs {expected}: reinstall or re-download it")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _fashion_mnist_files(root: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _FASHION_MNIST_PREFIX[split]
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


def _fashion_mnist_root(root: str | os.PathLike | None) -> Path:
    path = Path(root if root is not None else FASHION_MNIST_ROOT).expanduser()
    if not path.is_dir():
        raise DatasetError(f"Fashion-MNIST not found at {path}: install it with "
                           f"`sudo apt-get install dataset-fashion-mnist` or pass --data-root")
    return path.resolve()


def _open_fashion_mnist(root: str | os.PathLike | None, split: str, limit_per_class: int | None) -> ArrayImageDataset:
    # The split name is checked first: a wrong name is wrong whether or not the files are installed.
    if split not in _FASHION_MNIST_PREFIX:
        raise DatasetError(f"fashion-mnist has splits train and val (val is the official t10k test set), "
                           f"not {split!r}")
    root_path = _fashion_mnist_root(root)
    files = _fashion_mnist_files(root_path, split)
    if files is None:
        prefix = _FASHION_MNIST_PREFIX[split]
        raise DatasetError(f"Fashion-MNIST not found at {root_path} (no {prefix}-images-idx3-ubyte.gz / "
                           f"{prefix}-labels-idx1-ubyte.gz): install it with "
                           f"`sudo apt-get install dataset-fashion-mnist` or pass --data-root")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{files[0]} and {files[1]} do not form an image/label pair "
                           f"(shapes {images.shape}, {labels.shape}): reinstall the dataset")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise DatasetError(f"{files[1]} has labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}: reinstall it")
    if len(labels) == 0:
        raise DatasetError(f"{files[0]} holds no images: reinstall the dataset")
    indices = np.arange(len(labels))
    if limit_per_class is not None:
        indices = first_per_class(labels, limit_per_class)
    return ArrayImageDataset(name="fashion-mnist", root=str(root_path), split=split,
                             class_names=FASHION_MNIST_CLASSES, labels=labels[indices],
                             sample_ids=[str(i) for i in indices], limit_per_class=limit_per_class,
                             images=np.ascontiguousarray(images[indices]))


def _splits(root: str | os.PathLike | None) -> list[str]:
    root_path = _fashion_mnist_root(root)
    splits = [s for s in _FASHION_MNIST_PREFIX if _fashion_mnist_files(root_path, s) is not None]
    if not splits:
        raise DatasetError(f"Fashion-MNIST not found at {root_path} (no IDX files): install it with "
                           f"`sudo apt-get install dataset-fashion-mnist` or pass --data-root")
    return splits


READER = DatasetReader(
    name="fashion-mnist", splits=_splits, open=_open_fashion_mnist,
    description=f"Fashion-MNIST IDX files (Debian package dataset-fashion-mnist, default {FASHION_MNIST_ROOT}); "
                f"60k train / 10k val (= t10k test), 28x28 grey -> RGB")
