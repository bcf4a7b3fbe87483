"""The "process" stage of a build, run in DataLoader workers: decode a sample, make its canonical image
and its K views (view 0 = the centre crop; views 1..K-1 = seeded augmentations).

Each augmented view is drawn from its own generator seeded by (seed, sample index, view), so a view does
not depend on batching, sharding or which process computed it.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import augment, center_crop
from .datasets import CorruptImageError, ImageDataset, canonical_image


def view_seed(seed: int, index: int, view: int) -> int:
    """Seed of augmented view `view` of sample `index`: a hash, so it is independent of batching."""
    digest = hashlib.blake2b(f"{seed}:{index}:{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ViewDataset(Dataset):
    """Item i -> (i, [K, 3, S, S] views, None), or (i, None, reason) for a sample that cannot be decoded,
    so a broken file never stops the loader: the writer lists it as skipped."""

    def __init__(self, dataset: ImageDataset, resize_size: int, image_size: int, views: int, seed: int) -> None:
        self.dataset = dataset
        self.resize_size = resize_size
        self.image_size = image_size
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = self.dataset.load_image(index)
        except CorruptImageError as exc:
            return index, None, exc.reason
        canonical = canonical_image(image, self.resize_size)[None]
        out = [center_crop(canonical, self.image_size)]
        for view in range(1, self.views):
            gen = torch.Generator().manual_seed(view_seed(self.seed, index, view))
            out.append(augment(canonical, self.image_size, gen))
        return index, torch.cat(out).contiguous(), None


def collate_views(items: Sequence[tuple[int, torch.Tensor | None, str | None]]
                  ) -> tuple[np.ndarray, torch.Tensor | None, list[tuple[int, str]]]:
    """DataLoader collate_fn for `ViewDataset`: (indices of the decoded samples, their stacked views or
    None when none decoded, [(index, reason)] of the others)."""
    good = [(i, t) for i, t, _ in items if t is not None]
    failed = [(int(i), str(r)) for i, t, r in items if t is None]
    indices = np.array([i for i, _ in good], dtype=np.int64)
    images = torch.stack([t for _, t in good]) if good else None
    return indices, images, failed
