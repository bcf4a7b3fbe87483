"""engine.distill.backprop: the synthetic side's loss and image-parameter gradients, single pass and chunked,
against plain autograd through the whole decoded set; each pass decodes only its own images; Adam applied
image by image equals one update from the whole gradient."""

from __future__ import annotations

import pytest
import torch

from engine.distill import SyntheticSide
from engine.distill.adam import RowUpdate, adam
from engine.objectives import LGMObjective
from engine.parameterizations import PixelImages, PyramidImages
from featurestore.augment import AugmentConfig, apply_each
from featurestore.backbones import create_backbone

CLASSES, IPC, AUGS = 3, 2, 3


def _pyramid(backbone) -> PyramidImages:
    syn = PyramidImages(CLASSES, IPC, backbone.resize_size, init="noise", grow_every=1,
                        generator=torch.Generator().manual_seed(0))
    for s in range(4):
        syn.grow(s)
    return syn


def _pixels(backbone) -> PixelImages:
    return PixelImages(CLASSES, IPC, backbone.resize_size, init="noise", generator=torch.Generator().manual_seed(0))


def _loss_fn(dim: int):
    real = torch.randn(40, dim, generator=torch.Generator().manual_seed(1))
    real_y = torch.arange(40) % CLASSES
    obj = LGMObjective(CLASSES, head_std=0.1)

    def loss_fn(features, labels):
        return obj.loss(features, labels, real, real_y, torch.Generator().manual_seed(9))

    return loss_fn


def _autograd_reference(syn, side: SyntheticSide, plan, loss_fn):
    """The plain way: decode every image with a graph, copy m = augmentation m // n of image m % n, embed,
    loss, backward."""
    images = syn.images()
    m = syn.n * side.augs
    sources = images.index_select(0, torch.arange(m) % syn.n)
    features = side.backbone.embed(apply_each(sources, plan, side.backbone.image_size, side.augment_config), grad=True)
    loss = loss_fn(features, syn.labels.repeat(side.augs))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in syn.parameters()]


@pytest.mark.parametrize("make", [_pyramid, _pixels], ids=["pyramid", "pixels"])
@pytest.mark.parametrize("backbone_name", ["test-cnn", "test-vit"])
def test_single_pass_and_chunked_backprop_equal_plain_autograd(backbone_name, make):
    backbone = create_backbone(backbone_name)
    side = SyntheticSide(backbone, AUGS, True, AugmentConfig())
    syn = make(backbone)
    plan = side.draw(syn.n, torch.Generator().manual_seed(5))
    loss_fn = _loss_fn(backbone.dim)
    want_loss, want = _autograd_reference(syn, side, plan, loss_fn)
    for chunk in (10**6, 2, 3, 5):
        for p in syn.parameters():
            p.grad = None
        loss = side.loss_and_backward(syn, plan, chunk, loss_fn)
        torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
        for got, ref in zip([p.grad for p in syn.parameters()], want):
            assert ref.abs().max() > 0
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)


def test_each_pass_decodes_only_its_own_images():
    """Chunked, a pass decodes only the images its copies come from (image-major: about copies / augs, plus
    one where a boundary splits an image); single pass, the whole set once."""
    backbone = create_backbone("test-cnn")
    side = SyntheticSide(backbone, AUGS, True, AugmentConfig())
    syn = _pixels(backbone)
    plan = side.draw(syn.n, torch.Generator().manual_seed(5))
    decoded_rows = []
    original = syn.images_from

    def counting(params):
        decoded_rows.append(params[0].shape[0])
        return original(params)

    syn.images_from = counting
    for chunk in (4, 7, 2):
        side.loss_and_backward(syn, plan, chunk, _loss_fn(backbone.dim))
        # Position p (image-major) is a copy of image p // AUGS: a pass decodes the images its positions cover.
        want = [len({p // AUGS for p in range(s, min(s + chunk, syn.n * AUGS))})
                for s in range(0, syn.n * AUGS, chunk)]
        assert decoded_rows == want * 2  # a no-graph pass and a graph pass each
        assert max(want) <= -(-chunk // AUGS) + 1 and max(want) < syn.n
        decoded_rows.clear()
    side.loss_and_backward(syn, plan, 10**6, _loss_fn(backbone.dim))
    assert decoded_rows == [syn.n]


@pytest.mark.parametrize("make", [_pyramid, _pixels], ids=["pyramid", "pixels"])
@pytest.mark.parametrize("chunk", [10**6, 1, 2, 4, 7])
def test_adam_image_by_image_equals_one_update_from_the_whole_gradient(make, chunk):
    """into_adam (each image's rows updated once its copies are back-propagated; chunk 1, 2 and 4 split an
    image's 3 copies over passes) against into_grad and optimizer.step(), three steps from a fresh
    optimizer: parameters, moments and step counts."""
    backbone = create_backbone("test-cnn")
    side = SyntheticSide(backbone, AUGS, True, AugmentConfig())
    runs = []
    for way in ("whole", "rows"):
        syn = make(backbone)
        optimizer = adam(syn.parameters(), 0.05)
        for index in range(3):
            plan = side.draw(syn.n, torch.Generator().manual_seed(index))
            optimizer.zero_grad(set_to_none=True)
            _, backward = side.loss(syn, plan, chunk, _loss_fn(backbone.dim))
            if way == "whole":
                backward.into_grad()
                optimizer.step()
            else:
                backward.into_adam(RowUpdate(optimizer))
                assert all(p.grad is None for p in syn.parameters())  # no gradient of the whole set
        runs.append((syn, optimizer))
    (whole, whole_opt), (rows, rows_opt) = runs
    for a, b in zip(whole.parameters(), rows.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
        sa, sb = whole_opt.state[a], rows_opt.state[b]
        assert float(sb["step"]) == float(sa["step"]) == 3.0 and sb["step"].device == sa["step"].device
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[key], sa[key], atol=1e-7, rtol=1e-6)
    moved = [(p - q).abs().max() for p, q in zip(rows.parameters(), make(backbone).parameters())]
    assert min(moved) > 1e-3  # every parameter moved: the comparison is not of two untouched sets
