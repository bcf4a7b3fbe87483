"""Image sets as probes take them: an ImageFolder set read against a store's classes, and the features of
its views through a backbone. Shared by the evaluation protocol (`engine.evaluate`) and the neighbors
baseline (`engine.baselines`).

- `read_image_set(path, class_names)`: DIR, or DIR/images for a distill/baseline output directory
  (`resolve_image_dir`), whose class folders must all be classes of the store.
- `embed_views(backbone, images, views, generator)`: features [V, N, D] of augmented views drawn with
  `EVAL_AUGMENT` (flip + random resized crop, no pixel noise), or of the single centre-crop view.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from engine.distill.outdir import CONFIG_FILE, DISTILLED_FILE, IMAGES_DIR
from engine.imagefolder import read_imagefolder
from featurestore.augment import AugmentConfig, AugmentParams, apply_params, center_crop, sample_params
from featurestore.backbones import Backbone
from featurestore.errors import UserError

# Evaluation augmentation: the authors' flip + random resized crop, without the pixel noise that the
# distillation augmentation adds.
EVAL_AUGMENT = AugmentConfig(noise_p=0.0)
# Files that mark a distill or baseline output directory (its images are in images/).
RUN_MARKERS = (CONFIG_FILE, "baseline.json", DISTILLED_FILE)
_EMBED_BATCH = 128


# ----------------------------------------------------------------------------------------------------
# Reading a set


@dataclass
class ImageSet:
    """Images [N, 3, H, W] in [0, 1] with labels [N] indexing the store's classes."""

    path: Path
    images: torch.Tensor
    labels: torch.Tensor


def resolve_image_dir(path: str | os.PathLike) -> Path:
    """The ImageFolder root for DIR: DIR itself, or DIR/images for a distill/baseline output directory."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--images {p}: no such directory")
    nested = p / IMAGES_DIR
    if nested.is_dir():
        other_dirs = [c for c in p.iterdir() if c.is_dir() and c.name not in (IMAGES_DIR, "eval")
                      and not c.name.startswith(".")]
        if any((p / m).is_file() for m in RUN_MARKERS) or not other_dirs:
            return nested
    return p


def read_image_set(path: str | os.PathLike, class_names: Sequence[str]) -> ImageSet:
    """Read an ImageFolder set whose class folders must all be classes of the store."""
    root = resolve_image_dir(path)
    subdirs = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if not subdirs:
        raise UserError(f"--images {root}: no class folders (expected ImageFolder layout DIR/<class>/<image>.png)")
    try:
        images, labels, _ = read_imagefolder(root, class_names=list(class_names))
    except UserError:
        raise
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"--images {root}: {exc}") from None
    if images.shape[0] == 0:
        raise UserError(f"--images {root}: no images found in its class folders")
    return ImageSet(path=root, images=images.float(), labels=torch.as_tensor(labels, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# Features of a set through a backbone


@torch.no_grad()
def embed_views(backbone: Backbone, images: torch.Tensor, views: int, generator: torch.Generator | None,
                bar: Any = None) -> torch.Tensor:
    """Features [V, N, D] of `views` augmented views (flip + RRC) of images [N, 3, R, R].

    `generator=None` gives the single centre-crop view (V must be 1). The parameters of all V x N views
    are drawn at once (view-major), so the draw does not depend on the batch size; the V x N crops are
    then embedded in batches of up to 128 — sets of 10 images would otherwise make batches of 10.
    """
    if generator is None and views != 1:
        raise ValueError("the centre-crop view is a single view: views must be 1 without a generator")
    device = backbone.device
    n = images.shape[0]
    total = views * n
    params = None if generator is None else sample_params(total, generator, EVAL_AUGMENT)
    out = torch.empty(total, backbone.dim, dtype=torch.float32, device=device)
    for start in range(0, total, _EMBED_BATCH):
        stop = min(total, start + _EMBED_BATCH)
        chunk = images[torch.arange(start, stop) % n].to(device)
        if params is None:
            x = center_crop(chunk, backbone.image_size)
        else:
            sub = AugmentParams(theta=params.theta[start:stop], noise_on=params.noise_on[start:stop],
                                noise_seed=params.noise_seed)
            x = apply_params(chunk, sub, backbone.image_size, EVAL_AUGMENT)
        out[start:stop] = backbone.embed(x)
        if bar is not None:
            bar.update(stop - start)
    return out.view(views, n, backbone.dim)
