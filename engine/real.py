"""The real side of every objective: real features and labels, one batch per distillation step.

Two sources with the same sampling, so they are interchangeable and comparable:

- `StoreRealSource` (default): features from the feature store, loaded into memory (on the distill
  device) once. Each step takes `batch` rows drawn uniformly without replacement (`torch.randperm` on
  the real-side CPU generator; the authors' shuffled DataLoader also never repeats a row within a
  batch), or every row (`batch=None`: the exact full-split gradient, no sampling noise). With
  augmentation on and a store holding K views, each drawn row uses one of its K views, drawn uniformly
  (the stored counterpart of the authors' one fresh augmentation per real image per step). With
  augmentation off, view 0 (the centre crop) is used.
- `ImageRealSource` (`--real-source images`): the authors' end-to-end way. The same rows are drawn,
  their canonical images are loaded through the dataset, augmented once each (or centre-cropped when
  augmentation is off) and pushed through the backbone without a graph. Canonical images are kept in
  memory when the split fits in `cache_bytes` (decoding is the bottleneck of this mode otherwise).

With augmentation off and equal seeds both sources give the same rows and (up to floating-point
batching effects) the same features, hence the same real gradients: a tested invariant.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from featurestore.augment import AugmentConfig, augment, center_crop
from featurestore.datasets import canonical_image
from featurestore.runtime import free_memory


# `--real-batch auto`: the whole split every step (the exact gradient, which only a feature store can
# afford) when one step's real gradient costs at most this many multiply-adds (N x C x D per GEMM, two
# GEMMs): on 2 CPU cores ~0.2 s (benchmarks/results/bench_real_scale.md measures ~45-55 GFLOP/s there);
# on a datacenter GPU ~20 ms with TF32 (which distill enables on CUDA), the whole of ImageNet-1k at D = 768
# (9.8e11). Otherwise the largest uniform sample within the budget (never fewer rows than the authors'
# ipc * augs * C).
REAL_MACS_BUDGET = {"cpu": 1 << 32, "cuda": 1 << 41}
# The stored features of the real side may take this fraction of the free memory (RAM, or the GPU's):
# the rest is for the backbone, the synthetic side's graph and the optimizer.
REAL_MEMORY_FRACTION = 0.25


def plan_real_batch(option: int | str, num_rows: int, num_classes: int, dim: int, authors_batch: int,
                    device_type: str) -> tuple[int | None, str]:
    """(rows per step, None for every row; one line saying what was chosen and why)."""
    if option == "full":
        return None, f"real side: all {num_rows} rows every step (--real-batch full)"
    if option != "auto":
        batch = min(int(option), num_rows)
        return batch, f"real side: {batch} of {num_rows} rows per step (--real-batch {option})"
    budget = REAL_MACS_BUDGET.get(device_type, REAL_MACS_BUDGET["cpu"])
    macs = num_rows * num_classes * dim
    if macs <= budget:
        return None, (f"real side: all {num_rows} rows every step, the exact gradient (--real-batch auto: "
                      f"{macs:.2g} multiply-adds per step, budget {budget:.2g} on {device_type})")
    batch = min(num_rows, max(authors_batch, budget // (num_classes * dim)))
    if batch >= num_rows:  # the authors' batch alone already covers the split
        return None, (f"real side: all {num_rows} rows every step (--real-batch auto: over the {budget:.2g} "
                      f"multiply-add budget on {device_type}, but the authors' batch of {authors_batch} rows covers "
                      f"the split)")
    return batch, (f"real side: {batch} of {num_rows} rows per step, sampled (--real-batch auto: the whole split "
                   f"would cost {macs:.2g} multiply-adds per step, over the {budget:.2g} budget on {device_type})")


class RealSource(Protocol):
    num_rows: int

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(features float32 [B, D], labels int64 [B]) on the distill device."""
        ...

    def describe(self) -> dict: ...


def _draw_rows(num_rows: int, batch: int | None, generator: torch.Generator) -> Tensor:
    """Indices (into the loaded rows) of one real batch: all rows in order, or a random subset."""
    if batch is None:
        return torch.arange(num_rows)
    return torch.randperm(num_rows, generator=generator)[:batch]


class StoreRealSource:
    """Real features from the store (see the module docstring)."""

    def __init__(self, features: Tensor, labels: Tensor, *, batch: int | None, augment_views: bool = True,
                 device: str | torch.device = "cpu") -> None:
        """features: [N, D] (one view) or [N, K, D] (K views); labels: [N]. batch None = full split."""
        if features.ndim == 2:
            features = features[:, None, :]
        if features.ndim != 3 or features.shape[0] != labels.shape[0]:
            raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match")
        self.device = torch.device(device)
        self.views = features.shape[1] if augment_views else 1
        # Keep only the views that will be used: a K-view store with augmentation off costs 1 view.
        self.features = features[:, :self.views].to(self.device, torch.float32).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.num_rows = int(features.shape[0])
        self.batch = batch
        self.note: str | None = None  # set when only a sample of the split fits in memory

    @classmethod
    def from_split(cls, split, *, batch: int | None, augment_views: bool = True,
                   device: str | torch.device = "cpu", memory_budget: int | None = None) -> "StoreRealSource":
        """From a `featurestore.store.StoreSplit` (skipped samples are excluded by `load`).

        The features are held in memory on `device` (float32). A split larger than `memory_budget` bytes
        (default: REAL_MEMORY_FRACTION of the free memory) is never loaded whole: a fixed random sample
        of the rows that fits is (`note` says so), and steps draw their batches from it."""
        device = torch.device(device)
        views = split.views if augment_views and split.views > 1 else 1
        per_row = views * split.dim * 4
        budget = memory_budget if memory_budget is not None else int(REAL_MEMORY_FRACTION * free_memory(device))
        rows, note = None, None
        if split.num_valid * per_row > budget:
            valid = np.flatnonzero(split.labels() != -1)
            keep = max(1, budget // per_row)
            rows = np.sort(np.random.default_rng(0).choice(valid, size=min(keep, len(valid)), replace=False))
            note = (f"the split's {split.num_valid} rows need {split.num_valid * per_row / 2**30:.1f} GiB, over the "
                    f"{budget / 2**30:.1f} GiB memory budget: a fixed random sample of {len(rows)} rows is used")
        data = split.load(view="all" if views > 1 else 0, rows=rows)
        source = cls(data.features, data.labels, batch=batch, augment_views=augment_views, device=device)
        source.note = note
        return source

    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = _draw_rows(self.num_rows, self.batch, generator)
        if self.views > 1:
            view = torch.randint(0, self.views, (idx.shape[0],), generator=generator)
        else:
            view = torch.zeros(idx.shape[0], dtype=torch.int64)
        idx_d, view_d = idx.to(self.device), view.to(self.device)
        return self.features[idx_d, view_d], self.labels[idx_d]

    def describe(self) -> dict:
        return {"source": "store", "rows": self.num_rows, "views_used": self.views,
                "batch": "full" if self.batch is None else self.batch, "memory_note": self.note}


class ImageRealSource:
    """Real features computed end to end from the images every step (see the module docstring)."""

    def __init__(self, dataset, rows: Tensor, labels: Tensor, backbone, *, batch: int | None,
                 augment_images: bool = True, augment_config: AugmentConfig = AugmentConfig(),
                 forward_batch: int = 64, cache_bytes: int = 1 << 30) -> None:
        """dataset: an ImageDataset; rows: dataset indices of the usable samples, in the same order as the
        store source's rows; labels: their labels."""
        self.dataset = dataset
        self.rows = rows.cpu().to(torch.int64)
        self.device = backbone.device
        self.labels = labels.to(self.device, torch.int64)
        self.backbone = backbone
        self.batch = batch
        self.augment_images = augment_images
        self.augment_config = augment_config
        self.forward_batch = forward_batch
        self.num_rows = int(self.rows.shape[0])
        r = backbone.resize_size
        self._cache: dict[int, Tensor] | None = {} if self.num_rows * 3 * r * r * 4 <= cache_bytes else None

    @classmethod
    def from_split(cls, split, backbone, *, batch: int | None, augment_images: bool = True) -> "ImageRealSource":
        """Real images of a store split, found in its source by sample id (a source folder that changed
        since the build cannot swap images between rows)."""
        data = split.load(view=0)
        dataset, indices = split.source(data.rows)
        return cls(dataset, torch.tensor(indices, dtype=torch.int64), data.labels, backbone, batch=batch,
                   augment_images=augment_images)

    def _canonical(self, row: int) -> Tensor:
        if self._cache is not None and row in self._cache:
            return self._cache[row]
        image = canonical_image(self.dataset.load_image(row), self.backbone.resize_size)
        if self._cache is not None:
            self._cache[row] = image
        return image

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = _draw_rows(self.num_rows, self.batch, generator)
        images = torch.stack([self._canonical(int(self.rows[i])) for i in idx]).to(self.device)
        size = self.backbone.image_size
        if self.augment_images:
            # One augmentation draw for the whole batch, from the real-side generator.
            images = augment(images, size, generator, self.augment_config)
        else:
            images = center_crop(images, size)
        return self.backbone.embed(images, batch_size=self.forward_batch), self.labels[idx.to(self.device)]

    def describe(self) -> dict:
        return {"source": "images", "rows": self.num_rows, "augment": self.augment_images,
                "batch": "full" if self.batch is None else self.batch,
                "cached_in_memory": self._cache is not None}
