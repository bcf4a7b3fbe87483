"""engine.real: the stored real side and the end-to-end one (real images through the backbone) agree without
augmentation, and the whole split comes with its stored views."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.objectives import LGMObjective
from engine.real import ImageRealSource, StoreRealSource
from featurestore.backbones import create_backbone
from featurestore.store import FeatureStore

BACKBONE = "test-cnn"
PER_CLASS = 6
CLASSES = 10


@pytest.fixture(scope="module")
def store(make_gratings_store) -> Path:
    return make_gratings_store(BACKBONE, splits=["train"], limit_per_class=PER_CLASS, dtype="fp32", views=2)


def test_store_and_end_to_end_real_gradients_agree_without_augmentation(store):
    split = FeatureStore.open(store).split(BACKBONE, "train")
    backbone = create_backbone(BACKBONE)
    from_store = StoreRealSource.from_split(split, batch=17, augment_views=False)
    from_images = ImageRealSource.from_split(split, backbone, batch=17, augment_images=False)
    obj = LGMObjective(CLASSES, head_std=0.5)
    for seed in range(3):
        fs, ls = from_store.sample(torch.Generator().manual_seed(seed))
        fi, li = from_images.sample(torch.Generator().manual_seed(seed))
        assert torch.equal(ls, li) and fs.shape == (17, backbone.dim)
        torch.testing.assert_close(fi, fs, atol=1e-5, rtol=1e-5)
        gs_real, _ = obj.gradients(fs, ls, fs, ls, torch.Generator().manual_seed(seed))
        gi_real, _ = obj.gradients(fi, li, fi, li, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(gi_real, gs_real, atol=1e-7, rtol=1e-5)
    full = StoreRealSource.from_split(split, batch=None, augment_views=True)
    f_all, l_all = full.sample(torch.Generator().manual_seed(0))
    assert f_all.shape == (CLASSES * PER_CLASS, backbone.dim) and full.views == 2
    assert torch.equal(l_all, torch.arange(CLASSES).repeat_interleave(PER_CLASS))
