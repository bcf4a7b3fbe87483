"""Loader `random`: tiny networks with random weights (seed 0) for tests and trying the tool; a state
dict saved with torch.save can replace them (--weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError, one_line
from .loader import ERROR_LIMIT, LoadedModel, Loader
from .spec import BackboneSpec


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


def _seeded_model(spec: BackboneSpec, image_size: int) -> nn.Module:
    """The spec's tiny architecture initialized from seed 0, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec.architecture == "tiny-vit":
            from timm.models.vision_transformer import VisionTransformer

            return VisionTransformer(img_size=image_size, patch_size=spec.patch_size, embed_dim=spec.dim,
                                     depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0,
                                     global_pool="token", dynamic_img_size=True)
        if spec.architecture == "tiny-cnn":
            return _TinyCNN(spec.dim)
        # Unreachable while the registry's random specs and this function name the same architectures.
        raise BackboneError(f"no random architecture '{spec.architecture}'")


def _load_state_file(spec: BackboneSpec, model: nn.Module, weights: str) -> None:
    """Load a torch.save'd state dict into `model`, strictly; every failure is one BackboneError line."""
    if not Path(weights).is_file():
        raise BackboneError(f"--weights {weights} for backbone '{spec.name}': no such file; pass the path "
                            f"of a state dict saved with torch.save, or drop --weights")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of a foreign or truncated file
        raise BackboneError(f"could not read --weights {weights} for backbone '{spec.name}' "
                            f"({one_line(exc, ERROR_LIMIT)}); expected a state dict saved with "
                            f"torch.save") from None
    if not isinstance(state, dict):
        raise BackboneError(f"--weights {weights} holds a {type(state).__name__}, not a state dict: "
                            f"save model.state_dict() for backbone '{spec.name}'")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - missing/unexpected keys, shape mismatches
        raise BackboneError(f"--weights {weights} does not match backbone '{spec.name}' "
                            f"({one_line(exc, 200)})") from None


class RandomInitLoader(Loader):
    name = "random"

    def load(self, spec: BackboneSpec, image_size: int, weights: str | None) -> LoadedModel:
        model = _seeded_model(spec, image_size)
        if weights is not None:
            _load_state_file(spec, model, weights)
        return LoadedModel(model, model, weights)

    def weights_status(self, spec: BackboneSpec) -> tuple[bool, str]:
        return True, "random init"


LOADER = RandomInitLoader()
