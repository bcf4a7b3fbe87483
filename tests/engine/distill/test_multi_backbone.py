"""Distilling one set against several backbones at once: the per-backbone terms, chunking, resume, the
CLI, and the mismatches refused in one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.engine import app
from engine.distill import DistillConfig, DistillError, distill
from featurestore.build import build

BACKBONES = ["test-cnn", "test-vit"]  # both 32 px input, 36 px canonical images


@pytest.fixture(scope="module")
def store(make_gratings_store) -> Path:
    return make_gratings_store(*BACKBONES, limit_per_class=4, dtype="fp32")


def _config(store: Path, out: Path, **kw) -> DistillConfig:
    base = dict(store=str(store), backbone=list(BACKBONES), out=str(out), ipc=1, steps=7, augs=2, grow_every=1,
                checkpoint_every=2, quiet=True, device="cpu")
    base.update(kw)
    return DistillConfig(**base)


def test_each_backbone_term_is_its_single_backbone_loss(store, tmp_path):
    # From grey images: the centroid init of several backbones is their joint pick, not the first one's.
    both = distill(_config(store, tmp_path / "both", steps=7, eval_every=7, init="zero"))
    alone = distill(_config(store, tmp_path / "cnn", backbone=["test-cnn"], steps=7, init="zero"))
    lines = [json.loads(x) for x in (tmp_path / "both" / "metrics.jsonl").read_text().splitlines()]
    first = lines[0]
    # Step 1: the first backbone draws the same head and sees the same augmented copies as alone.
    assert first["loss_by_backbone"]["test-cnn"] == pytest.approx(alone.losses[0], rel=1e-6)
    # The loss is the (equally) weighted mean of the terms.
    assert first["loss"] == pytest.approx(sum(first["loss_by_backbone"].values()) / 2, rel=1e-6)
    probe = [m for m in lines if "probe_top1" in m][-1]
    assert set(probe["probe_top1_by_backbone"]) == set(BACKBONES)
    config = json.loads((tmp_path / "both" / "config.json").read_text())
    assert [b["name"] for b in config["backbones"]] == BACKBONES and [b["weight"] for b in config["backbones"]] == [0.5, 0.5]
    assert both.images.shape == alone.images.shape


def test_weights_chunking_and_resume(store, tmp_path):
    weighted = distill(_config(store, tmp_path / "w", backbone_weight=[3.0, 1.0]))
    lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    terms = lines[0]["loss_by_backbone"]
    assert lines[0]["loss"] == pytest.approx(0.75 * terms["test-cnn"] + 0.25 * terms["test-vit"], rel=1e-6)
    # Chunked back-propagation per backbone: the same images as one pass with the whole graph.
    chunked = distill(_config(store, tmp_path / "c", backbone_weight=[3.0, 1.0], chunk=3))
    torch.testing.assert_close(chunked.images, weighted.images, rtol=1e-4, atol=1e-5)
    # Resume continues bit for bit: the finished 7-step run extended to 8 steps is the straight 8-step run.
    extended = distill(_config(store, tmp_path / "w", backbone_weight=[3.0, 1.0], steps=8, resume=True))
    straight = distill(_config(store, tmp_path / "s", backbone_weight=[3.0, 1.0], steps=8))
    assert extended.resumed_from == 7
    assert extended.losses == straight.losses and torch.equal(extended.images, straight.images)


def test_a_checkpoint_of_another_backbone_set_is_refused(store, tmp_path):
    out = tmp_path / "run"
    distill(_config(store, out, backbone=["test-cnn"]))
    with pytest.raises(DistillError, match=r"--backbone \['test-cnn'\] -> \['test-cnn', 'test-vit'\]"):
        distill(_config(store, out, steps=8, resume=True))


def test_cli_and_mismatches(store, tmp_path):
    runner = CliRunner()
    common = ["distill", "--store", str(store), "--steps", "7", "--augs", "1", "--quiet", "--device", "cpu"]
    ok = runner.invoke(app, [*common, "--backbone", "test-cnn", "--backbone", "test-vit", "--backbone-weight", "2",
                             "--backbone-weight", "1", "--out", str(tmp_path / "cli")])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, [*common, "--backbone", "test-cnn", "--backbone", "dinov2-vits14", "--out",
                              str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no dinov2-vits14/train" in bad.output
    bad = runner.invoke(app, [*common, "--backbone", "test-cnn", "--backbone", "test-vit", "--backbone-weight", "1",
                              "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "one per --backbone" in bad.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_backbones_of_other_samples_or_sizes_are_refused(tmp_path):
    store = tmp_path / "fs"
    build("gratings", "test-cnn", store, limit_per_class=4, dtype="fp32", workers=0, quiet=True)
    build("gratings", "test-vit", store, limit_per_class=4, dtype="fp32", workers=0, quiet=True, image_size=40)
    with pytest.raises(DistillError, match="different image size"):
        distill(_config(store, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_eval_table_has_the_mean_over_unseen_backbones(store, tmp_path):
    from engine.baselines import make_baseline
    from engine.evaluate import UNSEEN_COLUMN, evaluate

    distill(_config(store, tmp_path / "cnn", backbone=["test-cnn"]))
    make_baseline(store, "test-vit", "random", tmp_path / "random", device="cpu", quiet=True)
    make_baseline(store, "test-vit", "centroid", tmp_path / "centroid", device="cpu", quiet=True)
    result = evaluate(store, {"cnn": tmp_path / "cnn", "random": tmp_path / "random",
                              "centroid": tmp_path / "centroid"}, BACKBONES, seeds=1, epochs=3, full=True,
                      full_epochs=1, device="cpu", quiet=True)
    assert result.sources == {"cnn": ["test-cnn"], "random": [], "centroid": ["test-vit"]}
    header, rows = result.table()
    assert header == ["set", *BACKBONES, UNSEEN_COLUMN]
    by_row = {r[0]: r for r in rows}
    assert by_row["cnn"][-1] == f"{result.rows['cnn']['test-vit'].top1_mean:.1f}"
    assert by_row["centroid"][-1] == f"{result.rows['centroid']['test-cnn'].top1_mean:.1f}"
    both = (result.rows["random"]["test-cnn"].top1_mean + result.rows["random"]["test-vit"].top1_mean) / 2
    assert by_row["random"][-1] == f"{both:.1f}" and by_row["full"][-1] == "-"


def test_centroid_init_of_several_backbones_is_their_joint_pick(store):
    """The image nearest its class mean for every backbone at once: the argmin over the class's samples of
    the sum over backbones of the squared distance to that backbone's class mean, each divided by the
    backbone's mean within-class squared distance (a reference computation in float64)."""
    from engine.baselines import pick_cluster_centroids
    from engine.distill.prepare import _init_features
    from featurestore.store import FeatureStore

    splits = [FeatureStore.open(store).split(name, "train") for name in BACKBONES]
    features, data = _init_features(splits)
    picked = pick_cluster_centroids(features, data.labels.numpy(), 10, 1)
    loaded = [split.load(view=0) for split in splits]
    labels = loaded[0].labels.numpy()
    cost = np.zeros(len(labels))
    for part in loaded:
        f = part.features.double().numpy()
        centred = f - np.stack([f[labels == c].mean(0) for c in range(10)])[labels]
        cost += (centred ** 2).sum(1) / ((centred ** 2).sum() / len(f))
    for c in range(10):
        members = np.flatnonzero(labels == c)
        assert picked[c].tolist() == [members[np.argmin(cost[members])]]
    # One backbone: its own features, unscaled (the single-backbone pick is unchanged) - and here a pick
    # of another image for some class, so the joint pick is not the first backbone's by construction.
    alone, _ = _init_features(splits[:1])
    np.testing.assert_array_equal(alone, loaded[0].features.numpy())
    first_only = pick_cluster_centroids(alone, labels, 10, 1)
    assert any(first_only[c].tolist() != picked[c].tolist() for c in range(10))
