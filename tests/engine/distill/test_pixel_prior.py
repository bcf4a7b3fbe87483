"""`--pixel-prior` (engine.distill.pixel_prior): the real images' statistics it reads, its value against a
float64 reference, its pull on the images, its checkpointed state and its bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.distill import DistillError, distill
from engine.distill.pixel_prior import MIN_SPREAD, PixelStatistics, class_statistics, pixel_prior, real_pixel_statistics
from featurestore.store import FeatureStore
from tests.engine.distill.test_distill_faults import BACKBONE, _cli, _config, _one_line_error, _solid_store


def test_the_real_statistics_are_those_of_the_source_images(tmp_path):
    """Red class a, blue class b (solid 40 px images): per-channel means 1/0/0 and 0/0/1, no contrast, and
    the spreads at their floor (every image of a class alike)."""
    _, path = _solid_store(tmp_path)
    split = FeatureStore.open(path).split(BACKBONE, "train")
    stats = real_pixel_statistics(split, 2, split.resize_size)
    assert torch.equal(stats.mean, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(stats.std, torch.zeros(2, 3))
    assert torch.equal(stats.mean_spread, torch.full((2, 3), MIN_SPREAD))
    assert torch.equal(stats.std_spread, torch.full((2, 3), MIN_SPREAD))


def test_class_statistics_and_the_prior_against_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(12, 3, 8, 8, generator=gen) ** 2
    real_labels = torch.tensor([0, 1, 2] * 4)
    stats = class_statistics(real, real_labels, 3)
    flat = real.double().numpy().reshape(12, 3, -1)
    means, stds = flat.mean(2), flat.std(2)
    for c in range(3):
        rows = real_labels.numpy() == c
        np.testing.assert_allclose(stats.mean[c], means[rows].mean(0), rtol=1e-6)
        np.testing.assert_allclose(stats.std[c], stds[rows].mean(0), rtol=1e-6)
        np.testing.assert_allclose(stats.mean_spread[c], np.maximum(means[rows].std(0), MIN_SPREAD), rtol=1e-6)
        np.testing.assert_allclose(stats.std_spread[c], np.maximum(stds[rows].std(0), MIN_SPREAD), rtol=1e-6)

    synthetic = torch.rand(6, 3, 8, 8, generator=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    flat = synthetic.double().numpy().reshape(6, 3, -1)
    z_mean = np.abs(flat.mean(2) - stats.mean.double().numpy()[labels]) / stats.mean_spread.double().numpy()[labels]
    z_std = np.abs(flat.std(2) - stats.std.double().numpy()[labels]) / stats.std_spread.double().numpy()[labels]
    expected = 0.5 * (np.maximum(z_mean - 1, 0) ** 2 + np.maximum(z_std - 1, 0) ** 2).mean()
    assert expected > 0.1  # uniform noise is outside the squared noise's range: the hinge is active
    assert float(pixel_prior(synthetic, labels, stats)) == pytest.approx(expected, rel=1e-5)
    # The real images themselves: within one spread of their class on most channels, never far outside.
    assert float(pixel_prior(real, real_labels, stats)) < 0.2 * expected


def test_an_image_within_one_spread_costs_nothing():
    """Half of the pixels at 0.35, half at `low`: the prior per channel against mean 0.3 +- 0.1, std 0.2 +- 0.05."""
    stats = PixelStatistics(mean=torch.full((1, 3), 0.3), std=torch.full((1, 3), 0.2),
                            mean_spread=torch.full((1, 3), 0.1), std_spread=torch.full((1, 3), 0.05))
    label = torch.tensor([0])
    for low, expected in ((0.15, 0.5 * (2.0 - 1.0) ** 2),  # mean 0.25 (inside), std 0.1: 2 spreads low
                          (-0.01, 0.5 * 0.3 ** 2),  # mean 0.17: 1.3 spreads low; std 0.18 (inside)
                          (0.05, 0.0)):  # mean 0.2, std 0.15: one spread each, on the edge: free
        image = torch.full((1, 3, 4, 4), 0.35)
        image[..., :2, :] = low
        assert float(pixel_prior(image, label, stats)) == pytest.approx(expected, rel=1e-4, abs=1e-10)


def test_the_prior_pulls_the_images_toward_their_class(tmp_path):
    """From grey images on red/blue classes: with a strong prior the images end much closer to their class's
    statistics than without it, and the prior's logged value falls; without it nothing is logged or kept."""
    _, path = _solid_store(tmp_path)
    split = FeatureStore.open(path).split(BACKBONE, "train")
    stats = real_pixel_statistics(split, 2, split.resize_size)
    runs = {weight: distill(_config(path, tmp_path / f"w{weight}", init="zero", steps=12, pixel_prior=weight,
                                    lr=0.05))
            for weight in (0.0, 100.0)}
    final = {w: float(pixel_prior(r.images, r.labels, stats)) for w, r in runs.items()}
    assert final[100.0] < 0.5 * final[0.0]
    logged = [json.loads(line) for line in (tmp_path / "w100.0" / "metrics.jsonl").read_text().splitlines()]
    values = [m["pixel_prior"] for m in logged if "loss" in m]
    assert len(values) == 12 and values[-1] < 0.5 * values[0]
    assert "pixel_prior" not in (tmp_path / "w0.0" / "metrics.jsonl").read_text()
    assert "pixel_statistics" not in torch.load(tmp_path / "w0.0" / "checkpoint.pt", weights_only=True)


def test_resume_keeps_the_statistics_reads_no_image_and_is_bit_for_bit(tmp_path):
    root, path = _solid_store(tmp_path)
    options = dict(init="zero", pixel_prior=10.0, lr=0.05, checkpoint_every=3)
    straight = distill(_config(path, tmp_path / "straight", steps=14, **options))
    distill(_config(path, tmp_path / "run", steps=8, **options))
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["pixel_statistics"]
    assert torch.equal(saved["mean"], torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    shutil.rmtree(root)  # a resume reads no real image: the checkpoint holds what the prior needs
    resumed = distill(_config(path, tmp_path / "run", steps=14, resume=True, **options))
    assert torch.equal(resumed.images, straight.images) and resumed.losses == straight.losses
    with pytest.raises(DistillError, match="--pixel-prior 10.0 -> 1.0"):
        distill(_config(path, tmp_path / "run", steps=15, resume=True, **{**options, "pixel_prior": 1.0}))


def test_a_source_that_is_gone_is_one_line(tmp_path):
    root, path = _solid_store(tmp_path)
    shutil.rmtree(root / "train" / "b")
    with pytest.raises(DistillError, match="--pixel-prior reads 6 real images from the store's source"):
        distill(_config(path, tmp_path / "run", init="zero", pixel_prior=1.0))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_pixel_prior_is_one_line_and_writes_nothing(tmp_path, value):
    _, path = _solid_store(tmp_path)
    out = tmp_path / "run"
    line = _one_line_error(_cli("distill", "--store", str(path), "--backbone", BACKBONE, "--out", str(out),
                                "--pixel-prior", value))
    assert "--pixel-prior must be a finite number >= 0" in line
    assert not out.exists()
