"""Parameterizations of the synthetic images: what the optimizer actually updates.

Both classes hold `n = num_classes * ipc` images with hard, fixed labels (image i has class i // ipc)
and decode them to `[n, 3, R, R]` in [0, 1], R = the backbone's `resize_size` (the synthetic image
lives at the canonical real-image resolution and reaches the backbone through the same
augment / centre-crop path as real images).

`PyramidImages` is LGM's parameterization (as in the authors' code):
- levels of resolution 1, 2, 4, ... up to R (the last one is R itself when R is not a power of two);
  it starts with the 1x1 level and a level of twice the resolution is added every `grow_every` steps;
- decoded image = sum of the bilinear upsamplings (align_corners=False, no antialias) of all levels,
  then a fixed 3x3 colour-correlation matrix (Lucid's ImageNet colour matrix, columns normalized by
  the largest column norm: the levels live in a decorrelated colour space), then sigmoid(2x);
- noise init as the authors: the first level is N(0, 1); when a level is added, the existing levels
  are scaled by old_len / new_len and the new one is N(0, 1) / new_len (every level keeps an equal
  share of the total). Zero init (the authors' `init_mode="zero"`): every level starts at zero (grey
  images) and is added as zero, so growth never changes the decoded image. `grow_init="zero"` instead adds the new level as zeros (the decoded image is
  unchanged by growth);
- Adam state is reset when a level is added (the authors rebuild the optimizer): `grow()` returns True
  and the distill loop builds a fresh optimizer over `parameters()`.
- real init: the pyramid starts complete (all levels, no growth): the finest level holds the real image
  mapped back through the sigmoid and the colour matrix, the coarser levels are zero. A real image
  cannot be represented by a 1x1 level, so a growing pyramid would throw the init away.

Grey data (a store whose images are all grey, e.g. Fashion-MNIST): both parameterizations can hold one
channel, decoded as sigmoid(2x) and replicated to RGB (`channels=1`), so no colour the data never has can
appear in the synthetic images.

`PixelImages`: one [n, 3, R, R] tensor in the decorrelated colour space, decoded as the authors' pixel
parameterization (src/synsets/pixels.py): the same colour matrix, then sigmoid(2x) (not clamping:
gradients never vanish at the borders and the values stay in [0, 1] without projection). Noise init N(0,
1) (scaled by `noise_std`); real init maps the real image back through the sigmoid and the colour matrix.

In both, every parameter tensor has one row per image and an image depends on its own rows only: a subset
of the images decodes from the same rows of each parameter (`images_from`). The distill step relies on it
to decode, per backbone pass, only the images that pass uses (engine.distill.backprop).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Lucid's empirical ImageNet colour correlation (square root of the RGB covariance, from its SVD).
_COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                                            [0.27, 0.00, -0.05],
                                            [0.27, -0.09, 0.03]], dtype=torch.float64)
COLOR_CORRELATION = (_COLOR_CORRELATION_SVD_SQRT
                     / torch.linalg.norm(_COLOR_CORRELATION_SVD_SQRT, dim=0).max()).float()

# Real-image init: pixel values are clamped away from 0 and 1 before the inverse sigmoid.
_LOGIT_EPS = 1e-3


def synthetic_labels(num_classes: int, ipc: int) -> Tensor:
    """Hard labels of the synthetic set: class c for images c*ipc .. c*ipc + ipc - 1."""
    return torch.arange(num_classes, dtype=torch.int64).repeat_interleave(ipc)


def pyramid_resolutions(resolution: int) -> list[int]:
    """1, 2, 4, ... doubling while below `resolution`, ending with `resolution` itself."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    sizes = [1]
    while sizes[-1] < resolution:
        sizes.append(min(2 * sizes[-1], resolution))
    return sizes


def decorrelated_to_rgb(x: Tensor) -> Tensor:
    """[n, 3, H, W] in the decorrelated colour space -> correlated RGB logits (before the sigmoid)."""
    matrix = COLOR_CORRELATION.to(device=x.device, dtype=x.dtype)
    return torch.einsum("ij,njhw->nihw", matrix, x)


def rgb_to_decorrelated(x: Tensor) -> Tensor:
    matrix = torch.linalg.inv(COLOR_CORRELATION.double()).to(device=x.device, dtype=x.dtype)
    return torch.einsum("ij,njhw->nihw", matrix, x)


def _logit(images: Tensor) -> Tensor:
    return torch.logit(images.clamp(_LOGIT_EPS, 1 - _LOGIT_EPS))


def decode(x: Tensor, decorrelate: bool = True) -> Tensor:
    """Parameters [n, c, H, W] -> images [n, 3, H, W] in [0, 1]: sigmoid(2 * colour(x)) for c = 3 (the
    decorrelated colour space; plain RGB logits with decorrelate=False, the authors' decorrelate_color
    off), sigmoid(2x) replicated to three channels for c = 1 (grey images)."""
    if x.shape[1] == 1:
        return torch.sigmoid(2 * x).expand(-1, 3, -1, -1)
    return torch.sigmoid(2 * (decorrelated_to_rgb(x) if decorrelate else x))


def encode(images: Tensor, channels: int, decorrelate: bool = True) -> Tensor:
    """The inverse of `decode` for real images [n, 3, H, W] in [0, 1] (grey: their channel mean), as one
    contiguous tensor filled block by block: the clamp, logit and colour transform of the whole set at
    once were three more copies of it (at 1000 images the start-up's peak)."""
    out = torch.empty(images.shape[0], channels, *images.shape[2:], dtype=images.dtype, device=images.device)
    for start in range(0, images.shape[0], _ENCODE_BLOCK):
        block = images[start:start + _ENCODE_BLOCK]
        logits = _logit(block.mean(dim=1, keepdim=True) if channels == 1 else block) / 2
        out[start:start + _ENCODE_BLOCK] = rgb_to_decorrelated(logits) if decorrelate and channels == 3 else logits
    return out


_ENCODE_BLOCK = 64  # images per block of `encode`


def _parameter(values: Tensor, copy: bool = False) -> Tensor:
    """A parameter tensor of `values`, contiguous, requiring grad (`copy`: never sharing their memory).
    Contiguous because the encode's einsum returns a permuted layout, and Adam's fused update copies
    non-contiguous tensors to contiguous ones at every step (measured: a transient of the set's size)."""
    values = values.detach()
    values = values.clone(memory_format=torch.contiguous_format) if copy else values.contiguous()
    return values.requires_grad_(True)


def check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 3 (colour) or 1 (grey), got {channels}")


class PyramidImages:
    """LGM's multi-scale pyramid parameterization (see the module docstring)."""

    kind = "pyramid"

    def __init__(self, num_classes: int, ipc: int, resolution: int, *, init: str, grow_every: int = 200,
                 real_images: Tensor | None = None, grow_init: str = "authors",
                 channels: int = 3, decorrelate: bool = True, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu") -> None:
        check_channels(channels)
        self.channels = channels
        self.decorrelate = decorrelate
        if grow_every < 1:
            raise ValueError(f"grow_every must be >= 1, got {grow_every}")
        if grow_init not in ("authors", "zero"):
            raise ValueError(f"grow_init must be 'authors' or 'zero', got {grow_init!r}")
        self.num_classes = num_classes
        self.ipc = ipc
        self.n = num_classes * ipc
        self.resolution = resolution
        self.grow_every = grow_every
        self.init = init
        self.grow_init = grow_init
        self.device = torch.device(device)
        self.labels = synthetic_labels(num_classes, ipc).to(self.device)
        self.sizes = pyramid_resolutions(resolution)
        # Noise for new levels is drawn from this CPU generator, so growth is reproducible on any device
        # (its state is part of `state_dict`).
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if init == "noise":
            self.levels = [self._noise(self.sizes[0])]
        elif init == "zero":
            # The authors' init_mode="zero": grey images; every level added later is zero too (see _add_level).
            self.levels = [torch.zeros(self.n, channels, self.sizes[0], self.sizes[0], device=self.device)]
        elif init == "real":
            if real_images is None or tuple(real_images.shape) != (self.n, 3, resolution, resolution):
                raise ValueError(f"real init needs images of shape {(self.n, 3, resolution, resolution)}")
            levels = [torch.zeros(self.n, channels, s, s, device=self.device) for s in self.sizes]
            levels[-1] = encode(real_images.to(self.device, torch.float32), channels, decorrelate)
            self.levels = levels
        else:
            raise ValueError(f"init must be 'noise', 'zero' or 'real', got {init!r}")
        self.levels = [_parameter(level) for level in self.levels]

    def _noise(self, size: int) -> Tensor:
        return torch.randn(self.n, self.channels, size, size, generator=self.generator).to(self.device)

    @property
    def complete(self) -> bool:
        return len(self.levels) == len(self.sizes)

    def parameters(self) -> list[Tensor]:
        return list(self.levels)

    def levels_at(self, step: int) -> int:
        """How many levels the noise-init pyramid has while running step `step` (0-based)."""
        return min(len(self.sizes), 1 + step // self.grow_every)

    def grow(self, step: int) -> bool:
        """Add levels due by step `step` (0-based); True if any was added (the optimizer must be reset)."""
        grew = False
        while len(self.levels) < self.levels_at(step):
            self._add_level()
            grew = True
        return grew

    @torch.no_grad()
    def _add_level(self) -> None:
        old_len = len(self.levels)
        new_len = old_len + 1
        size = self.sizes[old_len]
        if self.grow_init == "authors" and self.init != "zero":
            levels = [level.detach() * (old_len / new_len) for level in self.levels]
            levels.append(self._noise(size) / new_len)
        else:
            levels = [level.detach().clone() for level in self.levels]
            levels.append(torch.zeros(self.n, self.channels, size, size, device=self.device))
        self.levels = [_parameter(level) for level in levels]

    def images(self) -> Tensor:
        return self.images_from(self.levels)

    def images_from(self, levels: list[Tensor]) -> Tensor:
        """Decoded images of these levels: `parameters()` itself, or the same rows of each level."""
        r = self.resolution
        total = None
        for level in levels:
            up = level if level.shape[-1] == r else F.interpolate(level, size=(r, r), mode="bilinear",
                                                                   align_corners=False, antialias=False)
            total = up if total is None else total + up
        return decode(total, self.decorrelate)

    def state_dict(self) -> dict[str, Any]:
        # References, as torch's Module.state_dict (on a CPU the live tensors): the checkpoint writes them at
        # once, and a copy would hold the set twice at every checkpoint. load_state_dict copies.
        return {"kind": self.kind, "levels": [level.detach().cpu() for level in self.levels],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint holds a {state.get('kind')} parameterization, not {self.kind}")
        levels = state["levels"]
        for level, size in zip(levels, self.sizes):
            if tuple(level.shape) != (self.n, self.channels, size, size):
                raise ValueError(f"checkpoint level of shape {tuple(level.shape)} does not fit "
                                 f"{self.n} images at {self.resolution} px")
        self.levels = [_parameter(level.to(self.device), copy=True) for level in levels]
        self.generator.set_state(state["generator"])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "resolution": self.resolution, "levels": self.sizes,
                "grow_every": self.grow_every, "grow_init": self.grow_init, "init": self.init,
                "colour": _COLOUR_TEXT[self.channels] if self.decorrelate or self.channels == 1 else "RGB logits (no "
                "colour decorrelation)", "decode": "sigmoid(2x)"}


class PixelImages:
    """Direct pixels: sigmoid(2 * colour(x)) of an [n, 3, R, R] tensor (see the module docstring)."""

    kind = "pixels"

    def __init__(self, num_classes: int, ipc: int, resolution: int, *, init: str,
                 real_images: Tensor | None = None, noise_std: float = 1.0, channels: int = 3,
                 decorrelate: bool = True, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu") -> None:
        check_channels(channels)
        self.channels = channels
        self.decorrelate = decorrelate
        self.num_classes = num_classes
        self.ipc = ipc
        self.n = num_classes * ipc
        self.resolution = resolution
        self.init = init
        self.device = torch.device(device)
        self.labels = synthetic_labels(num_classes, ipc).to(self.device)
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if init == "noise":
            logits = noise_std * torch.randn(self.n, channels, resolution, resolution, generator=generator)
        elif init == "zero":
            logits = torch.zeros(self.n, channels, resolution, resolution)
        elif init == "real":
            if real_images is None or tuple(real_images.shape) != (self.n, 3, resolution, resolution):
                raise ValueError(f"real init needs images of shape {(self.n, 3, resolution, resolution)}")
            logits = encode(real_images.float().cpu(), channels, decorrelate)
        else:
            raise ValueError(f"init must be 'noise', 'zero' or 'real', got {init!r}")
        self.logits = _parameter(logits.to(self.device))

    complete = True

    def parameters(self) -> list[Tensor]:
        return [self.logits]

    def grow(self, step: int) -> bool:
        return False

    def images(self) -> Tensor:
        return self.images_from([self.logits])

    def images_from(self, params: list[Tensor]) -> Tensor:
        """Decoded images of `[logits]`: `parameters()` itself, or some of its rows."""
        (logits,) = params
        return decode(logits, self.decorrelate)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "logits": self.logits.detach().cpu()}  # references: see PyramidImages

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint holds a {state.get('kind')} parameterization, not {self.kind}")
        if tuple(state["logits"].shape) != tuple(self.logits.shape):
            raise ValueError(f"checkpoint pixels of shape {tuple(state['logits'].shape)} do not fit "
                             f"{tuple(self.logits.shape)}")
        self.logits = _parameter(state["logits"].to(self.device), copy=True)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "resolution": self.resolution, "init": self.init,
                "colour": _COLOUR_TEXT[self.channels] if self.decorrelate or self.channels == 1 else "RGB logits (no "
                "colour decorrelation)", "decode": "sigmoid(2x)"}


_COLOUR_TEXT = {3: "RGB through Lucid's ImageNet colour correlation, column-normalized",
                1: "grey: one channel replicated to RGB"}
SyntheticImages = PyramidImages | PixelImages


def make_synthetic(kind: str, num_classes: int, ipc: int, resolution: int, *, init: str,
                   real_images: Tensor | None = None, grow_every: int = 200, channels: int = 3,
                   decorrelate: bool = True, generator: torch.Generator | None = None,
                   device: str | torch.device = "cpu") -> SyntheticImages:
    """`pyramid` (LGM, default) or `pixels`; `channels` 3 (colour) or 1 (grey). `init` (noise, zero or
    real) has no default here: the default is `DistillConfig.init`'s."""
    if kind == "pyramid":
        return PyramidImages(num_classes, ipc, resolution, grow_every=grow_every, init=init,
                             real_images=real_images, channels=channels, decorrelate=decorrelate,
                             generator=generator, device=device)
    if kind == "pixels":
        return PixelImages(num_classes, ipc, resolution, init=init, real_images=real_images, channels=channels,
                           decorrelate=decorrelate, generator=generator, device=device)
    raise ValueError(f"parameterization must be 'pyramid' or 'pixels', got {kind!r}")


def pyramid_full_step(resolution: int, grow_every: int) -> int:
    """First step (0-based) at which a noise-init pyramid has all its levels."""
    return (len(pyramid_resolutions(resolution)) - 1) * grow_every


# The authors add a level every 200 of 5000 steps: 256 px (8 growths) from step 1600, about a third of the
# run; the rest refines the full-resolution image. `auto` keeps that proportion for any --steps.
FULL_RESOLUTION_FRACTION = 1 / 3


def auto_grow_every(resolution: int, steps: int) -> int:
    """Steps between pyramid levels so that full resolution is reached at about a third of `steps`."""
    growths = len(pyramid_resolutions(resolution)) - 1
    if growths == 0:
        return steps
    return max(1, int(steps * FULL_RESOLUTION_FRACTION) // growths)


def check_schedule(resolution: int, grow_every: int, steps: int) -> str | None:
    """Why a noise-init pyramid growing every `grow_every` steps would not reach `resolution` within
    `steps` steps (a run would end with only coarse levels), or None when it does."""
    sizes = pyramid_resolutions(resolution)
    full = pyramid_full_step(resolution, grow_every)
    if full < steps:
        return None
    levels = min(len(sizes), 1 + (steps - 1) // grow_every)
    need = len(sizes) - 1
    hints = [f"--steps {full + 1} or more"]
    if steps > need:
        hints.append(f"--grow-every {(steps - 1) // need} or less")
    return (f"with --grow-every {grow_every} and --steps {steps} the pyramid would end at {sizes[levels - 1]} px "
            f"({levels} of {len(sizes)} levels; {resolution} px from step {full + 1}): use {', '.join(hints)}, "
            f"or --grow-every auto")


__all__ = ["PyramidImages", "PixelImages", "SyntheticImages", "make_synthetic", "synthetic_labels",
           "pyramid_resolutions", "pyramid_full_step", "auto_grow_every", "check_schedule", "COLOR_CORRELATION", "decorrelated_to_rgb",
           "rgb_to_decorrelated"]
