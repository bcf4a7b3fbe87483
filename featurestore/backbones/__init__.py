"""Backbones: a short name maps to a small spec (loader, weights source, resolution, normalization,
pooling), in the spirit of timm's `create_model(name)`, split the way timm splits it:

- `spec.py`: `BackboneSpec` (what a backbone is, as data) and the normalization constants;
- `backbone.py`: `Backbone`, the one interface every backbone has;
- `registry.py`: `register`, `get_spec`, `list_backbones`, and the registered specs;
- `factory.py`: `create_backbone`, `weights_status`, `LOADERS`;
- `loader.py`: what a loader is; `<kind>_loader.py`: the loader of each `BackboneSpec.loader` kind;
  `imgfocus.py`, `opennsfw.py`: models rebuilt from ONNX files, beside their loaders.

Every backbone takes float RGB images in [0, 1] at its input size, applies its own normalization,
returns [B, D] embeddings and is differentiable with respect to the input (the engine back-propagates
through it). Its `fingerprint` (hash of weights + spec) is recorded in stores.
"""

from __future__ import annotations

from .backbone import Backbone
from .factory import LOADERS, create_backbone, weights_status
from .loader import LoadedModel, Loader
from .registry import get_spec, list_backbones, register
from .spec import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, TF_LITE_MEAN, TF_LITE_STD,
                   BackboneSpec)

__all__ = [
    "Backbone", "BackboneSpec", "LOADERS", "LoadedModel", "Loader", "create_backbone", "get_spec",
    "list_backbones", "register", "weights_status",
    "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_MEAN", "OPENAI_STD", "TF_LITE_MEAN", "TF_LITE_STD",
]
