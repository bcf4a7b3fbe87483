"""Differentiable, seeded augmentation shared by the store (augmented views of real images) and the
engine (synthetic images, and real images in end-to-end mode), so both sides see one family.

LGM's "DSA-like" recipe: horizontal flip p=0.5; random resized crop to the backbone's input size with
scale (0.08, 1) and ratio (3/4, 4/3), done with an affine sampling grid (zero padding) so gradients
flow to the pixels; additive Gaussian pixel noise N(mean, std^2) with p=0.5.
Random parameters are drawn on a CPU generator and moved to the images' device, so a seed gives the
same augmentation on CPU and GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    flip_p: float = 0.5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    noise_p: float = 0.5
    # As quoted from the authors' recipe (reference/methods.md): additive N(0.5, 0.2^2) pixel noise.
    noise_mean: float = 0.5
    noise_std: float = 0.2

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class AugmentParams:
    """One draw of augmentation parameters for N images (kept so a draw can be replayed exactly)."""

    theta: torch.Tensor  # [N, 2, 3] affine sampling matrices (flip folded into the x scale)
    noise_on: torch.Tensor  # [N] bool
    noise_seed: int


def sample_params(n: int, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> AugmentParams:
    """Draw crop/flip/noise parameters for `n` images from a CPU generator."""
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    lo, hi = cfg.crop_scale
    area = lo + (hi - lo) * u[:, 0]
    log_r = math.log(cfg.crop_ratio[0]) + (math.log(cfg.crop_ratio[1]) - math.log(cfg.crop_ratio[0])) * u[:, 1]
    ratio = torch.exp(log_r)
    # Crop width/height as fractions of the source side; the sampling grid spans [-w, w] x [-h, h]. Not
    # clamped at 1, as the authors' RandomResizedCrop (src/augmentation/ops/random_resized_crop.py): a
    # crop of scale ~1 and ratio 4/3 is 1.15 wide and samples zero padding beyond the image.
    w = torch.sqrt(area * ratio)
    h = torch.sqrt(area / ratio)
    cx = (2 * u[:, 2] - 1) * (1 - w)
    cy = (2 * u[:, 3] - 1) * (1 - h)
    flip = torch.where(u[:, 4] < cfg.flip_p, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    noise_on = u[:, 5] < cfg.noise_p
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return AugmentParams(theta=theta.float(), noise_on=noise_on, noise_seed=noise_seed)


def apply_params(images: torch.Tensor, params: AugmentParams, out_size: int,
                 cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Apply a drawn augmentation to [N, 3, S, S] images in [0, 1]; differentiable in `images`."""
    n = images.shape[0]
    theta = params.theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n, images.shape[1], out_size, out_size], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.noise_p > 0 and bool(params.noise_on.any()):
        gen = torch.Generator(device="cpu").manual_seed(params.noise_seed)
        noise = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device, out.dtype)
        noise = cfg.noise_mean + cfg.noise_std * noise
        mask = params.noise_on.to(out.device).view(n, 1, 1, 1).to(out.dtype)
        out = out + mask * noise
    return out


def apply_each(images: torch.Tensor, params: list[AugmentParams], out_size: int,
               cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """`apply_params(images[i:i+1], params[i])` for every i, as one batched sampling pass: the same values
    (sampling is per output pixel; each image's noise comes from its own draw's seed), at the cost of one
    call instead of N. Differentiable in `images`."""
    n = images.shape[0]
    if len(params) != n or any(p.theta.shape[0] != 1 for p in params):
        raise ValueError(f"apply_each needs one single-image draw per image: {len(params)} draws, {n} images")
    theta = torch.cat([p.theta for p in params]).to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n, images.shape[1], out_size, out_size], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    noisy = [i for i, p in enumerate(params) if bool(p.noise_on[0])] if cfg.noise_p > 0 else []
    if noisy:
        noise = torch.zeros(out.shape, dtype=torch.float32)
        for i in noisy:
            gen = torch.Generator(device="cpu").manual_seed(params[i].noise_seed)
            noise[i] = cfg.noise_mean + cfg.noise_std * torch.randn((1, *out.shape[1:]), generator=gen,
                                                                     dtype=torch.float32)[0]
        mask = torch.zeros(n, 1, 1, 1, dtype=out.dtype)
        mask[noisy] = 1
        out = out + mask.to(out.device) * noise.to(out.device, out.dtype)
    return out


def augment(images: torch.Tensor, out_size: int, generator: torch.Generator,
            cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Flip + random resized crop (affine grid) + pixel noise, seeded by `generator` (CPU)."""
    return apply_params(images, sample_params(images.shape[0], generator, cfg), out_size, cfg)


def center_crop(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """Centre crop [N, 3, S, S] -> [N, 3, out, out] (the no-augmentation view)."""
    s_h, s_w = images.shape[-2:]
    if out_size > min(s_h, s_w):
        raise ValueError(f"cannot centre-crop {s_h}x{s_w} to {out_size}")
    top = (s_h - out_size) // 2
    left = (s_w - out_size) // 2
    return images[..., top:top + out_size, left:left + out_size]


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square bilinear (antialiased) resize, used to move images between backbone resolutions."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
