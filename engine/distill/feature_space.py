"""The feature space an objective compares the two sides in (`--feature-space`).

standardized: every feature dimension shifted by the real split's mean and divided by its std, the same
affine map on the real and the synthetic side. Both come from the store's class statistics (count, mean,
E[x^2] per class), so no stored feature is read for them. Why: a backbone's few high-variance dimensions
(DINOv2's outlier channels) otherwise dominate the head gradients' cosine, and the images are optimised to
move those dimensions only; measured in benchmarks/results/diag_defaults.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Variance floor as a fraction of the mean variance: a dimension (nearly) constant on the real data (a dead
# ReLU channel) is not amplified without bound when a synthetic image moves it.
VARIANCE_FLOOR = 1e-2


@dataclass(frozen=True)
class FeatureMap:
    """x -> (x - shift) * scale, per dimension (float32 [D] each)."""

    shift: Tensor
    scale: Tensor

    def __call__(self, features: Tensor) -> Tensor:
        return (features - self.shift) * self.scale

    def to(self, device: torch.device) -> "FeatureMap":
        return FeatureMap(self.shift.to(device), self.scale.to(device))


def split_moments(split) -> tuple[np.ndarray, np.ndarray]:
    """(mean, variance) float64 [D] of the split's (view-0) features, from its class statistics."""
    counts = split.class_count().astype(np.float64)
    total = counts.sum()
    mean = (counts[:, None] * split.class_mean().astype(np.float64)).sum(0) / total
    sq_mean = (counts[:, None] * split.class_sq_mean().astype(np.float64)).sum(0) / total
    return mean, np.maximum(sq_mean - mean ** 2, 0.0)


def feature_map(space: str, split, device: torch.device) -> FeatureMap | None:
    """The map of `--feature-space` for a member's split; None for raw features (nothing applied)."""
    if space == "raw":
        return None
    mean, var = split_moments(split)
    scale = 1.0 / np.sqrt(var + VARIANCE_FLOOR * var.mean())
    return FeatureMap(torch.from_numpy(mean).float(), torch.from_numpy(scale).float()).to(device)
