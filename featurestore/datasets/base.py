"""`ImageDataset`: one labelled split of an image dataset, whatever stores its pixels, and `DatasetReader`,
the description of a dataset kind that the registry (`featurestore.datasets`) lists."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .decode import decode_image_file

SPLITS: tuple[str, str] = ("train", "val")


class DatasetWarning(UserWarning):
    """Something listing a dataset left out (duplicate paths, a Zarr store inside the root): `fs build`
    shows each as one `warning:` line on stderr."""


class ImageDataset:
    """A labelled split of an image dataset. Subclasses implement `_load(i) -> RGB PIL image`.

    Attributes: `name` (the registry name), `root` (str or None), `split`, `class_names`, `labels` (int64
    [N]), `sample_ids` (one string per sample that finds it again: the path relative to `root` for
    files, `"<index>"` into the original split for array datasets), `limit_per_class`, `warnings` (one-line
    notes about what listing left out). Instances are picklable, so DataLoader workers can decode (`featurestore.views`).
    """

    def __init__(self, *, name: str, root: str | None, split: str, class_names: Sequence[str],
                 labels: np.ndarray, sample_ids: Sequence[str], limit_per_class: int | None = None,
                 warnings: Sequence[str] = ()) -> None:
        self.name = name
        self.root = root
        self.split = split
        self.class_names: list[str] = list(class_names)
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)
        self.sample_ids: list[str] = list(sample_ids)
        self.limit_per_class = limit_per_class
        # One-line notes about what listing the samples left out (duplicates, foreign folders); `fs build`
        # shows each on stderr.
        self.warnings: list[str] = list(warnings)
        if len(self.labels) != len(self.sample_ids):
            raise ValueError("labels and sample_ids must have the same length")

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """Samples per class, int64 [C] (a class can have 0: see `empty_classes`)."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    @property
    def empty_classes(self) -> list[str]:
        """Names of classes with no samples in this split (kept so class indices stay stable)."""
        counts = self.class_counts()
        return [name for name, count in zip(self.class_names, counts) if count == 0]

    def open_args(self) -> dict:
        """Arguments that reopen this exact dataset: `open_dataset(**ds.open_args())`."""
        return {"name": self.name, "root": self.root, "split": self.split,
                "limit_per_class": self.limit_per_class}

    def describe(self) -> dict:
        """JSON-able summary for store attributes and `fs datasets`."""
        return {**self.open_args(), "num_samples": len(self), "num_classes": self.num_classes,
                "class_names": list(self.class_names), "empty_classes": self.empty_classes}

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample index {index} out of range for {n} samples")
        return index % n if n else index

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample `index`; raises `CorruptImageError` for a broken file."""
        return self._load(self._check_index(int(index)))

    def _load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def source_digest(self) -> str | None:
        """A digest of what the samples' pixels are read from, so that a resumed build can tell that the
        images changed under the same sample ids; None where they cannot change (generated data)."""
        return None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, root={self.root!r}, split={self.split!r}, "
                f"n={len(self)}, classes={self.num_classes})")


class FolderImageDataset(ImageDataset):
    """Images in `root/<split>/<class>/...` (sub-folders inside a class folder are included).

    Files are found again as `root/sample_id` (sample ids are POSIX paths relative to root), so no
    second list of absolute paths is held or pickled to workers.
    """

    def path(self, index: int) -> str:
        """Absolute path of sample `index`."""
        return os.path.join(self.root, self.sample_ids[self._check_index(int(index))])

    def _load(self, index: int) -> Image.Image:
        return decode_image_file(os.path.join(self.root, self.sample_ids[index]))

    def source_digest(self) -> str | None:
        """Size and modification time (ns) of every file, hashed: one stat per file, no read. A file
        rewritten in place changes both or at least its time; a missing file counts as changed."""
        h = hashlib.sha256()
        for sample_id in self.sample_ids:
            try:
                st = os.stat(os.path.join(self.root, sample_id))
                h.update(f"{sample_id}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{sample_id}\0missing\n".encode())
        return h.hexdigest()[:16]


class ArrayImageDataset(ImageDataset):
    """Images held in memory as uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB) arrays."""

    def __init__(self, *, images: np.ndarray, **kwargs) -> None:
        super().__init__(**kwargs)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(self.labels):
            raise ValueError("images must be uint8 [N, H, W] or [N, H, W, 3] aligned with labels")
        self._images = images

    def _load(self, index: int) -> Image.Image:
        return Image.fromarray(self._images[index]).convert("RGB")

    def source_digest(self) -> str | None:
        """The pixels themselves, hashed (they are in memory)."""
        return hashlib.sha256(np.ascontiguousarray(self._images).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class DatasetReader:
    """A dataset kind: how to list its splits and open one. One per dataset module, one registry line.

    `splits(root) -> [split names]` and `open(root, split, limit_per_class) -> ImageDataset` raise
    `DatasetError` with one line for bad input; `limit_per_class` arrives validated (a positive int or None).
    """

    name: str
    description: str
    splits: Callable[[str | os.PathLike | None], list[str]]
    open: Callable[[str | os.PathLike | None, str, int | None], ImageDataset]
    aliases: tuple[str, ...] = field(default=())


def first_per_class(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices (ascending) of the first `limit` samples of every class, in index order."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts  # position of each sample within its class
    return np.sort(order[rank < limit])
