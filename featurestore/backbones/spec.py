"""What a backbone is, as data: `BackboneSpec` (loader, weights source, resolution, normalization,
pooling) and the normalization constants the registered specs use.

A spec's fields (all but the cosmetic ones: aliases, the weights text, the default sizes) are part of
the backbone's fingerprint (`Backbone.fingerprint`): changing one makes the stores built with the old
value refused, so a field changes only when the network or its input really changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
TF_LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)  # (x - 127) / 128 on 0-255 pixels
TF_LITE_STD = (128 / 255, 128 / 255, 128 / 255)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a backbone and to say what its embedding is."""

    name: str
    loader: str  # name of the loader that builds it (`featurestore.backbones.factory.LOADERS`)
    architecture: str  # timm model name, open_clip architecture, or package model name
    dim: int
    embedding: str  # what the [B, D] output is, in words (recorded in stores)
    weights: str  # where pretrained weights come from, in words
    hub_id: str | None = None  # HF hub repo (timm) or open_clip pretrained tag
    image_size: int = 224
    resize_size: int = 256  # shorter side resized to this, then centre crop `image_size`
    normalization: str = "imagenet"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # The model's own resize interpolation, recorded in stores for reference only: every store resizes real
    # images with PIL bicubic (featurestore/datasets/decode.py, canonical_image), whatever this says. Part of
    # the fingerprint, so changing a value makes stores built with it refused.
    interpolation: str = "bicubic"
    patch_size: int | None = None
    aliases: tuple[str, ...] = field(default=())
    test_only: bool = False  # random weights, for tests and trying the tool

    def resolution_for(self, image_size: int | None) -> tuple[int, int]:
        """(resize_size, image_size) for a requested input size, keeping the resize/crop ratio."""
        if image_size is None:
            return self.resize_size, self.image_size
        if image_size <= 0:
            raise BackboneError(f"--image-size must be positive, got {image_size}")
        if self.patch_size and image_size % self.patch_size:
            raise BackboneError(
                f"{self.name} has patch size {self.patch_size}: --image-size must be a multiple of it "
                f"(got {image_size}; try {max(self.patch_size, image_size // self.patch_size * self.patch_size)})"
            )
        return round(image_size * self.resize_size / self.image_size), image_size

    def to_json(self) -> dict:
        return asdict(self)
