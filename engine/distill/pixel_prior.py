"""`--pixel-prior`: a loss term that keeps every synthetic image's pixel statistics inside the range of its
class's real images (issue 19: sets that drift to light backgrounds and saturated textures transfer badly).

The statistics are each image's per-channel mean and standard deviation of its pixels in [0, 1] (the
canonical image at the synthetic resolution). Their real range is estimated once, at the run's start, from
up to `PER_CLASS` real images of each class read from the store's source (evenly spaced over the class's
rows: no random draw, so the run's random streams are those of a run without the prior); the checkpoint
keeps the estimate, so a resume needs no reads. For every class and channel: the mean of each statistic over
those images and its spread (their standard deviation). The term is a hinge on the distance in spreads,

    weight * mean over images and channels of  (relu(|m - M| / dM - 1)^2 + relu(|s - S| / dS - 1)^2) / 2,

zero for an image whose statistics lie within one spread of its class's (a real-looking image is left to the
objective), quadratic beyond. Under torchrun rank 0 alone adds it (the ranks' gradients are summed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine.distill.config import DistillError, evenly_spaced
from featurestore.errors import UserError, one_line

PER_CLASS = 32  # real images per class the statistics are estimated from
MIN_SPREAD = 0.01  # a class whose images all share one statistic (e.g. generated test data): a 1 % band


@dataclass(frozen=True)
class PixelStatistics:
    """Per class and channel ([C, 3]): the mean over the class's real images of their pixel mean (`mean`)
    and pixel std (`std`), and the spread of each over those images (`mean_spread`, `std_spread`)."""

    mean: Tensor
    std: Tensor
    mean_spread: Tensor
    std_spread: Tensor

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std, "mean_spread": self.mean_spread, "std_spread": self.std_spread}

    @classmethod
    def from_state_dict(cls, state: Any) -> "PixelStatistics":
        try:
            tensors = {k: state[k].float() for k in ("mean", "std", "mean_spread", "std_spread")}
        except (KeyError, TypeError, AttributeError) as exc:
            raise DistillError(f"the checkpoint's pixel statistics are damaged ({type(exc).__name__}); "
                               f"start a new run in another --out") from None
        return cls(**tensors)

    def to(self, device: torch.device) -> "PixelStatistics":
        return PixelStatistics(**{k: v.to(device) for k, v in self.state_dict().items()})


def image_statistics(images: Tensor) -> tuple[Tensor, Tensor]:
    """(per-channel pixel mean, per-channel pixel std) of each image of [N, 3, R, R]: two [N, 3]."""
    flat = images.flatten(2)
    return flat.mean(2), flat.std(2, unbiased=False)


def class_statistics(images: Tensor, labels: Tensor, num_classes: int) -> PixelStatistics:
    """The statistics of `images` ([N, 3, R, R] in [0, 1]) of classes `labels`, class by class."""
    means, stds = image_statistics(images.double())
    out = {k: torch.zeros(num_classes, images.shape[1], dtype=torch.float64)
           for k in ("mean", "std", "mean_spread", "std_spread")}
    for c in range(num_classes):
        chosen = labels == c
        if not bool(chosen.any()):
            raise DistillError(f"--pixel-prior needs real images of every class; class {c} has none")
        for name, values in (("mean", means[chosen]), ("std", stds[chosen])):
            out[name][c] = values.mean(0)
            out[f"{name}_spread"][c] = values.std(0, unbiased=False)
    return PixelStatistics(mean=out["mean"].float(), std=out["std"].float(),
                           mean_spread=out["mean_spread"].clamp_min(MIN_SPREAD).float(),
                           std_spread=out["std_spread"].clamp_min(MIN_SPREAD).float())


def real_pixel_statistics(split, num_classes: int, resolution: int, per_class: int = PER_CLASS) -> PixelStatistics:
    """The statistics of up to `per_class` real images of each class of `split` (evenly spaced over the
    class's rows), read from the store's source at `resolution`."""
    labels = split.labels()
    rows, row_labels = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            raise DistillError(f"--pixel-prior needs real images of every class; class {c} "
                               f"({split.store.class_names[c]!r}) has none in the store")
        picks = members[evenly_spaced(members.size, per_class)]
        rows.extend(picks.tolist())
        row_labels.extend([c] * len(picks))
    try:
        images = split.canonical_images(rows, resolution)
    except UserError as exc:
        raise DistillError(f"--pixel-prior reads {len(rows)} real images from the store's source: {one_line(exc)}; "
                           f"make the source readable again, or run without --pixel-prior") from None
    return class_statistics(images, torch.tensor(row_labels), num_classes)


def pixel_prior(images: Tensor, labels: Tensor, stats: PixelStatistics) -> Tensor:
    """The prior's value (without its weight) for synthetic `images` [N, 3, R, R] of classes `labels`."""
    means, stds = image_statistics(images)
    z_mean = (means - stats.mean[labels]).abs() / stats.mean_spread[labels]
    z_std = (stds - stats.std[labels]).abs() / stats.std_spread[labels]
    return 0.5 * ((z_mean - 1).clamp_min(0) ** 2 + (z_std - 1).clamp_min(0) ** 2).mean()
