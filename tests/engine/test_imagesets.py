"""engine.imagesets: the evaluation views of an image set (flip + random resized crop, no noise)."""

from __future__ import annotations

import torch

from engine.imagesets import embed_views


def test_embed_views_are_flip_rrc_views_without_noise():
    from featurestore.augment import AugmentConfig, augment
    from featurestore.backbones import create_backbone

    model = create_backbone("test-cnn")
    images = torch.rand(5, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    feats = embed_views(model, images, 30, torch.Generator().manual_seed(1))  # 150 crops: two batches
    views = augment(images.repeat(30, 1, 1, 1), 32, torch.Generator().manual_seed(1), AugmentConfig(noise_p=0.0))
    with torch.no_grad():
        ref = model(views).view(30, 5, -1)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(feats[0], feats[1])  # views differ
