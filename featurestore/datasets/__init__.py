"""Labelled image datasets the feature store reads, one module per kind, one registry line each:
`imagenet` and `imagefolder` (folder.py), `fashion-mnist` (IDX files), `gratings` (procedural, no files).

Every dataset is an `ImageDataset` (base.py) with the same attributes: `name`, `root`, `split`,
`class_names`, `labels`, `sample_ids`, `empty_classes`, and `load_image(i) -> PIL.Image` in RGB. Split
names are `train` and `val` for every dataset, so callers can always ask for those two. How files are
decoded, and the canonical real image, are in decode.py.

To add a dataset: a module defining a `DatasetReader` (name, description, splits(root), open(root,
split, limit)), then the module in `from . import ...` and its reader in `_READERS` below.
"""

from __future__ import annotations

import os

from featurestore.errors import DatasetError

from . import fashion_mnist, folder, gratings
from .base import SPLITS, ArrayImageDataset, DatasetReader, DatasetWarning, FolderImageDataset, ImageDataset
from .decode import (IMAGE_EXTENSIONS, CorruptImageError, canonical_image, decode_image_file, describe_canonical,
                     pil_to_float_tensor, read_image_size, to_rgb)
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, read_idx

_READERS: tuple[DatasetReader, ...] = (
    folder.IMAGENET,
    folder.IMAGEFOLDER,
    fashion_mnist.READER,
    gratings.READER,
)
_BY_NAME: dict[str, DatasetReader] = {name: r for r in _READERS for name in (r.name, *r.aliases)}


def list_datasets() -> list[tuple[str, str]]:
    """(name, one-line description) of every dataset `open_dataset` knows."""
    return [(r.name, r.description) for r in _READERS]


def get_reader(name: str) -> DatasetReader:
    """The reader of dataset `name` (or one of its aliases); DatasetError naming the known ones."""
    if name not in _BY_NAME:
        raise DatasetError(f"unknown dataset {name!r}: known datasets are {', '.join(r.name for r in _READERS)}")
    return _BY_NAME[name]


def canonical_name(name: str) -> str:
    """The registry name of a dataset name or alias ('synthetic' -> 'gratings')."""
    return get_reader(name).name


def dataset_splits(name: str, root: str | os.PathLike | None = None) -> list[str]:
    """Splits present for dataset `name` at `root` (train and val first)."""
    return get_reader(name).splits(root)


def open_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                 limit_per_class: int | None = None) -> ImageDataset:
    """Open one split of a dataset. `limit_per_class=N` keeps the first N samples of each class (sorted
    file order, or index order for array datasets). Bad input raises DatasetError with one line."""
    reader = get_reader(name)
    if limit_per_class is not None:
        if isinstance(limit_per_class, bool) or int(limit_per_class) != limit_per_class or limit_per_class <= 0:
            raise DatasetError(f"--limit-per-class must be a positive integer, got {limit_per_class}")
        limit_per_class = int(limit_per_class)
    return reader.open(root, split, limit_per_class)


__all__ = ["SPLITS", "IMAGE_EXTENSIONS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "ImageDataset",
           "FolderImageDataset", "ArrayImageDataset", "DatasetReader", "DatasetWarning", "CorruptImageError", "canonical_image",
           "decode_image_file", "describe_canonical", "pil_to_float_tensor", "read_image_size", "to_rgb", "read_idx",
           "list_datasets", "get_reader", "canonical_name", "dataset_splits", "open_dataset"]
