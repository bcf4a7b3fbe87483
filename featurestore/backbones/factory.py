"""The factory: `create_backbone(name)` looks the spec up in the registry and has its loader build the
model; `weights_status(spec)` asks the same loader whether the weights are here. `LOADERS` is the one
table from `BackboneSpec.loader` to the loader object."""

from __future__ import annotations

import os

import torch

from ..errors import one_line
from . import (efficientnet_lite_loader, imgfocus_onnx_loader, open_clip_loader, opennsfw_onnx_loader,
               random_loader, timm_loader, timm_local_loader)
from .backbone import Backbone
from .loader import ERROR_LIMIT, Loader
from .registry import get_spec
from .spec import BackboneSpec

LOADERS: dict[str, Loader] = {loader.name: loader for loader in (
    timm_loader.LOADER,
    timm_local_loader.LOADER,
    open_clip_loader.LOADER,
    efficientnet_lite_loader.LOADER,
    imgfocus_onnx_loader.LOADER,
    opennsfw_onnx_loader.LOADER,
    random_loader.LOADER,
)}


def create_backbone(name: str, image_size: int | None = None, weights: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu") -> Backbone:
    """Build a frozen backbone by registry name (`fs backbones` lists them)."""
    spec = get_spec(name)
    resize_size, size = spec.resolution_for(image_size)
    model, embed, weights_used = LOADERS[spec.loader].load(spec, size, None if weights is None else str(weights))
    backbone = Backbone(spec, model, embed, image_size=size, resize_size=resize_size,
                        weights_path=None if weights_used is None else str(weights_used))
    return backbone.to(device)


def weights_status(spec: BackboneSpec) -> tuple[bool, str]:
    """(present, where) for `fs backbones`. Never downloads and never raises: it only looks at
    installed packages and the local Hugging Face cache."""
    try:
        loader = LOADERS.get(spec.loader)
        if loader is None:
            return False, f"unknown loader {spec.loader}"
        return loader.weights_status(spec)
    except Exception as exc:  # noqa: BLE001 - a status line must not break the listing
        return False, f"unknown ({one_line(exc, ERROR_LIMIT)})"
