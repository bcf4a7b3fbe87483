"""`gratings`: a procedural, deterministic labelled image dataset that needs no files (tests, demos).

Not to be confused with the distilled ("synthetic") images of `engine`: these are real training data
for the store, generated on the fly. The former name `synthetic` is kept as an alias, so stores built
under that name reopen.
"""

from __future__ import annotations

import colorsys
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from featurestore.errors import DatasetError

from .base import DatasetReader, ImageDataset

NAME = "gratings"


@dataclass(frozen=True)
class GratingsConfig:
    """Shape of the `gratings` dataset. Class c is an oriented grating patch: orientation
    `c % 5` (of 5, 36 degrees apart) and colour family `c // 5` (warm or cool), so neither colour nor
    orientation alone separates the classes. Every sample jitters orientation, spatial frequency, phase,
    patch position/size, colours and contrast, adds a random-colour distractor blob and pixel noise,
    all seeded by (seed, split, index): the same sample is the same image on every machine."""

    num_classes: int = 10
    per_class: tuple[tuple[str, int], ...] = (("train", 200), ("val", 50))
    image_size: int = 64
    seed: int = 0
    orientation_jitter_deg: float = 9.0
    noise_std: float = 0.06

    def count(self, split: str) -> int:
        return dict(self.per_class)[split]


_GRATING_ORIENTATIONS = 5
_GRATING_FAMILIES = ("warm", "cool")
# Hue ranges (HSV, in turns) of the two colour families.
_GRATING_HUES = {"warm": (0.95, 1.12), "cool": (0.45, 0.70)}


def grating_class_names(num_classes: int) -> list[str]:
    names = []
    for c in range(num_classes):
        angle = (c % _GRATING_ORIENTATIONS) * 180 // _GRATING_ORIENTATIONS
        family = _GRATING_FAMILIES[(c // _GRATING_ORIENTATIONS) % len(_GRATING_FAMILIES)]
        names.append(f"grating-{angle:03d}deg-{family}")
    return names


def render_grating(label: int, split: str, index: int, config: GratingsConfig = GratingsConfig()) -> np.ndarray:
    """The image of sample `index` of `split` (with class `label`): uint8 [S, S, 3]."""
    split_code = {"train": 0, "val": 1}.get(split)
    if split_code is None:
        split_code = int.from_bytes(split.encode()[:8].ljust(8, b"\0"), "little")
    rng = np.random.default_rng([config.seed, split_code, index, label])
    size = config.image_size
    orientation_step = math.pi / _GRATING_ORIENTATIONS
    # Classes beyond 2 * 5 repeat the pattern grid with a shifted orientation so they stay distinct.
    cycle = label // (_GRATING_ORIENTATIONS * len(_GRATING_FAMILIES))
    theta = ((label % _GRATING_ORIENTATIONS) + 0.5 * (cycle % 2)) * orientation_step
    theta += math.radians(rng.normal(0.0, config.orientation_jitter_deg))
    family = _GRATING_FAMILIES[(label // _GRATING_ORIENTATIONS) % len(_GRATING_FAMILIES)]

    coords = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres in (0, 1)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    frequency = rng.uniform(3.0, 6.0)  # cycles per image width
    phase = rng.uniform(0.0, 2 * math.pi)
    grating = 0.5 + 0.5 * np.sin(2 * math.pi * frequency * (x * math.cos(theta) + y * math.sin(theta)) + phase)

    def colour(hue_range: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
        hue = rng.uniform(*hue_range) % 1.0
        return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*sat), rng.uniform(*val)))

    background = rng.uniform(0.2, 0.8, size=3)
    stripe = colour(_GRATING_HUES[family], (0.55, 1.0), (0.6, 1.0))
    contrast = rng.uniform(0.5, 1.0)
    # A soft disk holds the grating; outside it the background shows.
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    radius = rng.uniform(0.28, 0.45)
    disk = 1.0 / (1.0 + np.exp(((np.hypot(x - cx, y - cy) - radius) / 0.02)))
    mix = (contrast * grating * disk)[..., None]
    image = background * (1 - mix) + stripe * mix
    # Distractor: a Gaussian blob of a random colour, unrelated to the class.
    bx, by = rng.uniform(0.0, 1.0, size=2)
    sigma = rng.uniform(0.05, 0.15)
    blob = (rng.uniform(0.3, 0.8) * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * sigma ** 2)))[..., None]
    image = image * (1 - blob) + rng.uniform(0.0, 1.0, size=3) * blob
    image = image + rng.normal(0.0, config.noise_std, size=image.shape)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


class GratingsDataset(ImageDataset):
    """Procedural images (see `GratingsConfig`); samples are ordered class by class."""

    def __init__(self, *, config: GratingsConfig, split: str, limit_per_class: int | None = None) -> None:
        per_class = config.count(split)
        keep = per_class if limit_per_class is None else min(per_class, limit_per_class)
        labels = np.repeat(np.arange(config.num_classes, dtype=np.int64), keep)
        original = (labels * per_class + np.tile(np.arange(keep), config.num_classes)).astype(np.int64)
        super().__init__(name=NAME, root=None, split=split,
                         class_names=grating_class_names(config.num_classes), labels=labels,
                         sample_ids=[str(i) for i in original], limit_per_class=limit_per_class)
        self.config = config
        self._original = original

    def _load(self, index: int) -> Image.Image:
        pixels = render_grating(int(self.labels[index]), self.split, int(self._original[index]), self.config)
        return Image.fromarray(pixels)


def _check_no_root(root: str | os.PathLike | None) -> None:
    if root is not None:
        raise DatasetError(f"the {NAME} dataset is generated, it reads no files: drop --data-root ({root})")


def _splits(root: str | os.PathLike | None) -> list[str]:
    _check_no_root(root)
    return [split for split, _ in GratingsConfig().per_class]


def _open(root: str | os.PathLike | None, split: str, limit_per_class: int | None) -> GratingsDataset:
    _check_no_root(root)
    config = GratingsConfig()
    if split not in dict(config.per_class):
        raise DatasetError(f"{NAME} has splits {', '.join(s for s, _ in config.per_class)}, not {split!r}")
    return GratingsDataset(config=config, split=split, limit_per_class=limit_per_class)


READER = DatasetReader(
    name=NAME, aliases=("synthetic",), splits=_splits, open=_open,
    description="procedural class-conditional gratings, 10 classes, 64x64, 200 train / 50 val per class; "
                "no files needed (alias: synthetic)")
