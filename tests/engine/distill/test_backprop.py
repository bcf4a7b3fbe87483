"""engine.distill.backprop: chunked back-propagation of the synthetic copies gives the single-pass loss and
gradients."""

from __future__ import annotations

import pytest
import torch

from engine.distill import SyntheticSide
from engine.objectives import LGMObjective
from engine.parameterizations import PyramidImages
from featurestore.augment import AugmentConfig
from featurestore.backbones import create_backbone


@pytest.mark.parametrize("backbone_name", ["test-cnn", "test-vit"])
def test_chunked_backprop_equals_single_pass(backbone_name):
    backbone = create_backbone(backbone_name)
    grads, losses = [], []
    for chunk in (10**6, 2, 3):
        syn = PyramidImages(3, 2, backbone.resize_size, init="noise", grow_every=1,
                            generator=torch.Generator().manual_seed(0))
        for s in range(4):
            syn.grow(s)
        forward = SyntheticSide(backbone, 3, True, AugmentConfig())
        plan = forward.draw(syn.n, torch.Generator().manual_seed(5))
        real = torch.randn(40, backbone.dim, generator=torch.Generator().manual_seed(1))
        real_y = torch.arange(40) % 3
        obj = LGMObjective(3, head_std=0.1)
        loss = forward.loss_and_backward(
            syn.images, syn.labels, plan, chunk,
            lambda f, y: obj.loss(f, y, real, real_y, torch.Generator().manual_seed(9)))
        losses.append(loss)
        grads.append([p.grad.clone() for p in syn.parameters()])
    for other_loss, other in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(other_loss, losses[0], atol=1e-6, rtol=1e-6)
        for a, b in zip(other, grads[0]):
            assert a.abs().max() > 0
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
