"""`Backbone`: the one interface every registered backbone has, whatever loaded it.

It takes float RGB images in [0, 1] at its input size, applies its own normalization, returns [B, D]
embeddings and is differentiable with respect to the input (the engine back-propagates through it).
Its `fingerprint` (hash of weights + spec) is recorded in stores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Callable

import torch
from torch import nn

from .spec import BackboneSpec


class Backbone(nn.Module):
    """A frozen feature extractor: [B, 3, S, S] in [0, 1] -> [B, D] embeddings."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, embed: Callable[[torch.Tensor], torch.Tensor],
                 image_size: int, resize_size: int, weights_path: str | None) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self._embed = embed
        self.image_size = image_size
        self.resize_size = resize_size
        self.weights_path = weights_path
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._fingerprint: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen backbone: dropout/BN always in inference mode, whatever the caller asks.
        super().train(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected [B, 3, H, W] images, got {tuple(images.shape)}")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self._embed(x)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def precision(self) -> contextlib.AbstractContextManager:
        """The one precision policy of every backbone pass (store features, real and synthetic sides,
        evaluation): bf16 autocast on CUDA (fp16 where the GPU lacks bf16), full fp32 elsewhere."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def embed(self, images: torch.Tensor, *, grad: bool = False, batch_size: int | None = None) -> torch.Tensor:
        """float32 [N, D] features of images [N, 3, S, S] in [0, 1] (S = `image_size`), under `precision()`.

        `grad=True`: one pass that keeps the graph to the images (the synthetic side). Otherwise no graph,
        in batches of `batch_size` (default: all at once), each moved to the backbone's device first.
        """
        if grad:
            with self.precision():
                return self(images).float()
        step = images.shape[0] if batch_size is None else batch_size
        out = []
        with torch.no_grad(), self.precision():
            for start in range(0, images.shape[0], max(1, step)):
                out.append(self(images[start:start + step].to(self.device, non_blocking=True)).float())
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=self.device)

    @property
    def fingerprint(self) -> str:
        """sha256 over the spec (minus cosmetic fields) and every weight tensor, in state-dict order."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            spec = self.spec.to_json()
            for cosmetic in ("aliases", "weights", "image_size", "resize_size"):
                spec.pop(cosmetic, None)
            h.update(json.dumps(spec, sort_keys=True).encode())
            for key, tensor in self.model.state_dict().items():
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict:
        """What a store records about the backbone that produced its features."""
        return {
            "spec": self.spec.to_json(),
            "fingerprint": self.fingerprint,
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "normalization": {"name": self.spec.normalization, "mean": list(self.spec.mean),
                              "std": list(self.spec.std)},
            "weights_path": self.weights_path,
        }
