"""--feature-space: the map's moments against the stored features, the map applied on both sides of the
objective, resume and CLI refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import engine.objectives as objectives
from cli.engine import app
from engine.distill import DistillConfig, DistillError, distill
from engine.distill.feature_space import VARIANCE_FLOOR, feature_map, split_moments
from engine.objectives import LGMObjective
from featurestore.store import FeatureStore

BACKBONE = "test-cnn"


@pytest.fixture(scope="module")
def store(make_gratings_store) -> Path:
    return make_gratings_store(BACKBONE, splits=["train"], limit_per_class=5, dtype="fp32", views=2)


def _config(store: Path, out: Path, **kw) -> DistillConfig:
    base = dict(store=str(store), backbone=BACKBONE, out=str(out), ipc=1, steps=3, augs=1,
                checkpoint_every=1, quiet=True, device="cpu", init="noise", param="pixels")
    base.update(kw)
    return DistillConfig(**base)


def test_moments_are_those_of_the_stored_view0_features(store):
    split = FeatureStore.open(store).split(BACKBONE, "train")
    features = split.load(view=0).features.double().numpy()
    mean, var = split_moments(split)
    np.testing.assert_allclose(mean, features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, features.var(0), rtol=1e-4, atol=1e-6)
    assert feature_map("raw", split, torch.device("cpu")) is None
    mapped = feature_map("standardized", split, torch.device("cpu"))(torch.from_numpy(features).float()).double()
    np.testing.assert_allclose(mapped.mean(0).numpy(), 0.0, atol=1e-4)
    expected_std = np.sqrt(var / (var + VARIANCE_FLOOR * var.mean()))  # 1 where the floor is negligible
    np.testing.assert_allclose(mapped.std(0, unbiased=False).numpy(), expected_std, rtol=1e-3, atol=1e-5)


def test_the_objective_sees_both_sides_through_the_map(store, tmp_path, monkeypatch):
    split = FeatureStore.open(store).split(BACKBONE, "train")
    mean, var = split_moments(split)
    seen = []
    original = LGMObjective.loss

    def spy(self, syn, syn_labels, real, real_labels, generator):
        seen.append((syn.detach().clone(), real.detach().clone()))
        return original(self, syn, syn_labels, real, real_labels, generator)

    monkeypatch.setattr(objectives.LGMObjective, "loss", spy)
    distill(_config(store, tmp_path / "std", feature_space="standardized", steps=1, real_batch="full",
                     augment=False))
    syn, real = seen[0]
    # The real side is every stored row (--real-batch full, --no-augment: view 0), standardized: mean 0.
    assert real.shape[0] == split.num_valid
    np.testing.assert_allclose(real.double().mean(0).numpy(), 0.0, atol=1e-4)
    scale = 1 / np.sqrt(var + VARIANCE_FLOOR * var.mean())
    raw_real = split.load(view=0).features.double().numpy()
    np.testing.assert_allclose(real.double().numpy(), (raw_real - mean) * scale, rtol=1e-4, atol=1e-4)
    # The synthetic side passed through the same map: a raw run from the same seed sees, at its first
    # step (the same images), the synthetic features before the map.
    seen.clear()
    distill(_config(store, tmp_path / "raw", feature_space="raw", steps=1, real_batch="full", augment=False))
    raw_syn, raw_real_seen = seen[0]
    np.testing.assert_allclose(raw_real_seen.double().numpy(), raw_real, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(syn.double().numpy(), (raw_syn.double().numpy() - mean) * scale, rtol=1e-3,
                               atol=1e-3)


def test_resume_with_another_feature_space_is_refused(store, tmp_path):
    out = tmp_path / "run"
    distill(_config(store, out, feature_space="raw"))
    with pytest.raises(DistillError, match="--feature-space 'raw' -> 'standardized'"):
        distill(_config(store, out, feature_space="standardized", resume=True, steps=4))


def test_cli_rejects_an_unknown_feature_space(store, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out),
                                      "--feature-space", "whitened", "--quiet", "--device", "cpu"])
    assert result.exit_code == 2
    assert "--feature-space must be raw or standardized, got 'whitened'" in result.output
    assert not out.exists()
