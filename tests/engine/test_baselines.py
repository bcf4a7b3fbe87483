"""Real-image baselines: picks vs numpy references, seeded random, bytes on disk, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.engine import app
from engine.baselines import make_baseline, pick_centroid, pick_neighbors, pick_random
from engine.imagefolder import class_folder_names, to_uint8, write_imagefolder
from featurestore.datasets import canonical_image
from featurestore.errors import UserError
from featurestore.store import FeatureStore


def test_pick_centroid_is_numpy_argmin():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 7)).astype(np.float32)
    labels = rng.integers(0, 3, size=60)
    picks = pick_centroid(feats, labels, 3, ipc=2)
    for c in range(3):
        members = np.flatnonzero(labels == c)
        d = ((feats[members] - feats[members].mean(0)) ** 2).sum(1)
        want = members[np.argsort(d)[:2]]
        pos, dist = picks[c]
        assert list(pos) == list(want)
        np.testing.assert_allclose(dist, np.sort(d)[:2], rtol=1e-4)


def test_pick_neighbors_is_numpy_cosine_argmax():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(80, 9)).astype(np.float32) * rng.uniform(0.1, 10, size=(80, 1)).astype(np.float32)
    labels = rng.integers(0, 4, size=80)
    queries = rng.normal(size=(6, 9)).astype(np.float32)
    qlabels = np.array([0, 1, 2, 3, 3, 0])
    pos, cos = pick_neighbors(feats, labels, queries, qlabels)
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for k, (q, c) in enumerate(zip(queries, qlabels)):
        sims = normed @ (q / np.linalg.norm(q))
        sims[labels != c] = -np.inf  # same class only
        assert pos[k] == int(np.argmax(sims))
        assert labels[pos[k]] == c
        np.testing.assert_allclose(cos[k], sims.max(), rtol=1e-5)


def test_pick_random_seeded_per_class():
    labels = np.repeat(np.arange(4), 10)
    a = pick_random(labels, 4, ipc=3, seed=5)
    b = pick_random(labels, 4, ipc=3, seed=5)
    c = pick_random(labels, 4, ipc=3, seed=6)
    for k in range(4):
        assert list(a[k]) == list(b[k]) and len(set(a[k])) == 3 and (labels[a[k]] == k).all()
    assert any(list(a[k]) != list(c[k]) for k in range(4))


# ---------------------------------------------------------------------------------------------------
# On a tiny store


@pytest.fixture(scope="module")
def tiny_store(make_gratings_store):
    return FeatureStore.open(make_gratings_store("test-cnn", limit_per_class=5))


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_centroid_baseline_on_disk(tiny_store, tmp_path):
    out = tmp_path / "centroid"
    record = make_baseline(tiny_store, "test-cnn", "centroid", out, ipc=2, quiet=True)
    split = tiny_store.split("test-cnn", "train")
    data = split.load()
    feats, labels = data.features.numpy(), data.labels.numpy()
    ids = split.sample_ids()
    ds = split.open_dataset()
    folders = class_folder_names(tiny_store.class_names)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(folders)
    on_disk = json.loads((out / "baseline.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for c, name in enumerate(tiny_store.class_names):
        members = np.flatnonzero(labels == c)
        d = ((feats[members].astype(np.float64) - feats[members].astype(np.float64).mean(0)) ** 2).sum(1)
        want_rows = data.rows.numpy()[members[np.argsort(d)[:2]]]
        picked = on_disk["picks"][name]
        assert [p["sample_id"] for p in picked] == [ids[r] for r in want_rows]
        for k, row in enumerate(want_rows):
            # The PNG holds the canonical image of the chosen sample, to the byte after uint8 rounding.
            expected = to_uint8(canonical_image(ds.load_image(int(row)), split.resize_size)[None])[0]
            np.testing.assert_array_equal(_png(out / "images" / folders[c] / f"{k}.png"), expected)


def test_random_baseline_deterministic(tiny_store, tmp_path):
    a = make_baseline(tiny_store, "test-cnn", "random", tmp_path / "a", ipc=2, seed=3, quiet=True)
    b = make_baseline(tiny_store, "test-cnn", "random", tmp_path / "b", ipc=2, seed=3, quiet=True)
    assert a["picks"] == b["picks"] and a["num_images"] == 20
    for name in tiny_store.class_names:
        f = class_folder_names([name])[0]
        for k in range(2):
            assert (tmp_path / "a" / "images" / f / f"{k}.png").read_bytes() == \
                   (tmp_path / "b" / "images" / f / f"{k}.png").read_bytes()
    labels = tiny_store.split("test-cnn", "train").labels()
    for c, name in enumerate(tiny_store.class_names):
        assert all(labels[p["row"]] == c for p in a["picks"][name])


def test_neighbors_baseline(tiny_store, tmp_path):

    split = tiny_store.split("test-cnn", "train")
    data = split.load()
    # A "distilled" set: noisy random images, two for class 0, one for class 3.
    g = torch.Generator().manual_seed(0)
    queries = torch.rand(3, 3, 36, 36, generator=g)
    qlabels = torch.tensor([0, 0, 3])
    write_imagefolder(tmp_path / "syn" / "images", queries, qlabels, tiny_store.class_names)
    record = make_baseline(tiny_store, "test-cnn", "neighbors", tmp_path / "nb", images=tmp_path / "syn",
                           device="cpu", quiet=True)
    assert record["num_images"] == 3
    # Reference: embed the PNG-rounded queries (centre crop), cosine argmax among same-class features.
    model = split.open_backbone("cpu")
    rounded = torch.from_numpy(to_uint8(queries)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        q = model(rounded[:, :, 2:34, 2:34]).numpy()
    feats = data.features.numpy()
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    ids = split.sample_ids()
    got = record["picks"][tiny_store.class_names[0]] + record["picks"][tiny_store.class_names[3]]
    for k, (qv, c) in enumerate(zip(q, qlabels.tolist())):
        sims = normed @ (qv / np.linalg.norm(qv))
        sims[data.labels.numpy() != c] = -np.inf
        assert got[k]["sample_id"] == ids[int(data.rows[int(np.argmax(sims))])]


def test_baseline_errors(tiny_store, tmp_path):
    with pytest.raises(UserError, match="unknown baseline kind"):
        make_baseline(tiny_store, "test-cnn", "kmeans", tmp_path / "x")
    with pytest.raises(UserError, match="needs --images"):
        make_baseline(tiny_store, "test-cnn", "neighbors", tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        make_baseline(tiny_store, "test-cnn", "random", busy)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "x").exists()


def test_cli_baseline(tiny_store, tmp_path):
    runner = CliRunner()
    base = ["baseline", "--store", str(tiny_store.path), "--backbone", "test-cnn", "--quiet"]
    res = runner.invoke(app, base + ["--kind", "random", "--out", str(tmp_path / "r"), "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "wrote 10 random images" in res.output
    assert len(list((tmp_path / "r" / "images").rglob("*.png"))) == 10
    res = runner.invoke(app, base + ["--kind", "nope", "--out", str(tmp_path / "n")])
    assert res.exit_code == 2 and "unknown baseline kind 'nope'" in res.output
    res = runner.invoke(app, base + ["--kind", "neighbors", "--out", str(tmp_path / "n")])
    assert res.exit_code == 2 and "--images" in res.output
    res = runner.invoke(app, ["baseline", "--store", str(tiny_store.path), "--backbone", "test-vit",
                              "--kind", "random", "--out", str(tmp_path / "v")])
    assert res.exit_code == 2 and "test-vit/train" in res.output
    assert not (tmp_path / "n").exists() and not (tmp_path / "v").exists()


def test_cluster_centroids_cover_each_class_with_distinct_samples():
    """--init centroid with ipc > 1: one sample per k-means cluster, distinct, each the nearest to its centre;
    ipc 1 is the centroid baseline's pick."""
    from engine.baselines import pick_centroid, pick_cluster_centroids

    gen = np.random.default_rng(0)
    # Class 0: two tight blobs far apart; class 1: one blob. Nearest-the-mean would take two samples of one
    # blob (or the gap); the clusters take one sample from each blob.
    blob_a = gen.normal(0, 0.1, (20, 4)) + [10, 0, 0, 0]
    blob_b = gen.normal(0, 0.1, (20, 4)) - [10, 0, 0, 0]
    other = gen.normal(0, 0.1, (20, 4)) + [0, 10, 0, 0]
    features = np.concatenate([blob_a, blob_b, other]).astype(np.float32)
    labels = np.array([0] * 40 + [1] * 20)
    picks = pick_cluster_centroids(features, labels, 2, 2)
    assert sorted(p // 20 for p in picks[0]) == [0, 1]  # one from each blob of class 0
    assert len(set(picks[1].tolist())) == 2 and all(20 * 2 <= p < 60 for p in picks[1])
    one = pick_cluster_centroids(features, labels, 2, 1)
    assert all(np.array_equal(one[c], pick_centroid(features, labels, 2, 1)[c][0]) for c in range(2))
