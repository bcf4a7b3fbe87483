"""Feature store writer/reader: numbers vs a reference computation, statistics, views, bad files,
several backbones, sharding, and kill-safety (a real subprocess killed with SIGKILL, then resumed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from featurestore.augment import augment, center_crop
from featurestore.backbones import create_backbone
from featurestore.build import build, parse_shard
from featurestore.distributed import contiguous_share as assign_units
from featurestore.views import view_seed
from featurestore.datasets import canonical_image, open_dataset
from featurestore.errors import StoreError, UserError
from featurestore.info import store_info
from featurestore.store import FeatureStore

REPO = Path(__file__).resolve().parents[2]
TINY = dict(splits=["train"], limit_per_class=4, chunk_rows=16, batch_size=8, workers=0, quiet=True)


def reference_features(backbone_name: str, dataset, views: list[int] | None = None, seed: int = 0) -> np.ndarray:
    """backbone(center_crop(canonical)) one image at a time (or the seeded augmented view)."""
    model = create_backbone(backbone_name)
    out = []
    with torch.inference_mode():
        for i in range(len(dataset)):
            canon = canonical_image(dataset.load_image(i), model.resize_size)[None]
            row = []
            for v in views or [0]:
                if v == 0:
                    x = center_crop(canon, model.image_size)
                else:
                    x = augment(canon, model.image_size, torch.Generator().manual_seed(view_seed(seed, i, v)))
                row.append(model(x)[0].numpy())
            out.append(np.stack(row))
    return np.stack(out)


def group_arrays(store: Path, backbone: str, split: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")[backbone][split]
    return {name: arr[:] for name, arr in group.arrays()}


def assert_groups_identical(a: Path, b: Path, backbone: str, split: str) -> None:
    arrays_a, arrays_b = group_arrays(a, backbone, split), group_arrays(b, backbone, split)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        x, y = arrays_a[name], arrays_b[name]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if x.dtype.kind in "fiu":
            assert x.tobytes() == y.tobytes(), f"{name} differs"  # bitwise, NaN fill included
        else:
            assert x.tolist() == y.tolist(), f"{name} differs"
    attrs_a = dict(zarr.open_group(str(a), mode="r")[backbone][split].attrs)
    attrs_b = dict(zarr.open_group(str(b), mode="r")[backbone][split].attrs)
    assert attrs_a == attrs_b


def test_assign_units_contiguous_and_covering():
    for n_units in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            ranges = [assign_units(n_units, r, world) for r in range(world)]
            assert [u for r in ranges for u in r] == list(range(n_units))
            assert all(r.step == 1 for r in ranges)
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UserError):
            parse_shard(bad)


def test_features_match_reference_and_stats(tmp_path):
    store = tmp_path / "s"
    report = build("gratings", "test-cnn", store, dtype="fp32", full_cov=True, **TINY)
    assert report.splits[0].complete and report.splits[0].written == 40
    ds = open_dataset("gratings", split="train", limit_per_class=4)
    sp = FeatureStore.open(store).split("test-cnn", "train")
    data = sp.load()
    ref = reference_features("test-cnn", ds)[:, 0]
    assert data.features.shape == (40, 24) and data.features.dtype == torch.float32
    np.testing.assert_allclose(data.features.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert data.labels.tolist() == ds.labels.tolist() and data.rows.tolist() == list(range(40))
    assert sp.sample_ids() == ds.sample_ids

    # Class statistics: float64 statistics of the stored (here fp32 = pre-cast) features.
    x = data.features.numpy().astype(np.float64)
    y = data.labels.numpy()
    counts = np.bincount(y, minlength=10)
    assert sp.class_count().tolist() == counts.tolist()
    mean = np.stack([x[y == c].mean(0) for c in range(10)])
    sq = np.stack([(x[y == c] ** 2).mean(0) for c in range(10)])
    second = np.stack([x[y == c].T @ x[y == c] / counts[c] for c in range(10)])
    np.testing.assert_allclose(sp.class_mean(), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sp.class_sq_mean(), sq, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sp.class_second_moment(), second, rtol=1e-6, atol=1e-8)

    # fp16 storage: features within half precision; statistics still from the float32 output.
    store16 = tmp_path / "s16"
    build("gratings", "test-cnn", store16, **TINY)
    sp16 = FeatureStore.open(store16).split("test-cnn", "train")
    assert sp16.group["features"].dtype == np.float16
    f16 = sp16.load().features.numpy()
    np.testing.assert_allclose(f16, ref, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(sp16.class_mean(), sp.class_mean(), rtol=1e-6, atol=1e-7)
    with pytest.raises(StoreError, match="full-cov"):
        sp16.class_second_moment()


def test_views_shape_seeded_and_view0_equals_single_view(tmp_path):
    build("gratings", "test-cnn", tmp_path / "one", **TINY)
    build("gratings", "test-cnn", tmp_path / "three", views=3, dtype="fp32",
          **{**TINY, "limit_per_class": 2})
    build("gratings", "test-cnn", tmp_path / "three16", views=3, **TINY)
    one = FeatureStore.open(tmp_path / "one").split("test-cnn", "train")
    three16 = FeatureStore.open(tmp_path / "three16").split("test-cnn", "train")
    assert three16.views == 3 and three16.group["features"].shape == (40, 3, 24)
    # View 0 goes through the backbone in the same batches as a single-view build: bit for bit.
    assert three16.load(view=0).features.numpy().tobytes() == one.load().features.numpy().tobytes()
    everything = three16.load(view="all").features
    assert everything.shape == (40, 3, 24)
    assert torch.equal(everything[:, 2], three16.load(view=2).features)
    assert not torch.allclose(everything[:, 0], everything[:, 1])
    assert one.load(view="all").features.shape == (40, 1, 24)
    with pytest.raises(StoreError, match="views 0..2"):
        three16.load(view=3)
    # Augmented views = augment() seeded by (seed, index, view), independent of batching.
    three = FeatureStore.open(tmp_path / "three").split("test-cnn", "train")
    ds = open_dataset("gratings", split="train", limit_per_class=2)
    ref = reference_features("test-cnn", ds, views=[0, 1, 2])
    np.testing.assert_allclose(three.load(view="all").features.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_corrupt_files_skipped_listed_and_excluded(tmp_path, image_folder):
    store = tmp_path / "s"
    report = build("imagefolder", "test-cnn", store, data_root=image_folder, chunk_rows=4, batch_size=3,
                   workers=1, quiet=True)
    (res,) = report.splits
    assert res.complete and res.rows == 17 and res.skipped == 2
    sp = FeatureStore.open(store).split("test-cnn", "train")
    reasons = {s["sample_id"]: s["reason"] for s in sp.skipped}
    assert set(reasons) == {"train/b/broken.jpg", "train/c/truncated.png"}
    assert "not an image" in reasons["train/b/broken.jpg"] and reasons["train/c/truncated.png"]
    labels = sp.labels()
    ids = sp.sample_ids()
    assert labels[ids.index("train/b/broken.jpg")] == -1
    data = sp.load()
    assert len(data.labels) == 15 and (data.labels >= 0).all() and torch.isfinite(data.features).all()
    assert sp.class_count().tolist() == [5, 5, 5, 0]
    assert sp.attrs["empty_classes"] == ["d"] and sp.num_valid == 15
    info = store_info(store)["backbones"]["test-cnn"]["splits"]["train"]
    assert info["num_skipped"] == 2 and info["empty_classes"] == ["d"]


def test_two_backbones_and_mismatch_protection(tmp_path, dir_digest):
    store = tmp_path / "s"
    build("gratings", "test-cnn", store, **TINY)
    build("gratings", "test-vit", store, **{**TINY, "splits": ["train", "val"]})
    fs = FeatureStore.open(store)
    assert fs.backbones() == ["test-cnn", "test-vit"]
    assert fs.splits("test-vit") == ["train", "val"]
    assert fs.split("test-vit", "val").load().features.shape == (40, 32)
    with pytest.raises(StoreError, match="test-cnn/val"):
        fs.split("test-cnn", "val")
    before = dir_digest(store)
    with pytest.raises(StoreError, match="built at 32 px"):
        build("gratings", "test-cnn", store, image_size=48, **{**TINY, "splits": ["val"]})
    with pytest.raises(StoreError, match="limit per class"):
        build("gratings", "test-cnn", store, **{**TINY, "limit_per_class": 5})
    with pytest.raises(StoreError, match="--views"):
        build("gratings", "test-cnn", store, views=2, **TINY)
    weights = tmp_path / "other.pt"
    model = create_backbone("test-cnn")
    torch.save({k: v + 0.01 for k, v in model.model.state_dict().items()}, weights)
    with pytest.raises(StoreError, match="different backbone"):
        build("gratings", "test-cnn", store, weights=weights, **TINY)
    assert dir_digest(store) == before


def test_shards_equal_single_build_and_finalize_by_last(tmp_path):
    kwargs = dict(TINY, limit_per_class=5, chunk_rows=8, workers=1)  # 50 rows, 7 units
    build("gratings", "test-cnn", tmp_path / "single", **kwargs)
    sharded = tmp_path / "sharded"
    first = build("gratings", "test-cnn", sharded, shard="1/2", **kwargs).splits[0]
    assert not first.complete and first.units_done == 4 and first.units_total == 7
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(sharded).split("test-cnn", "train")
    second = build("gratings", "test-cnn", sharded, shard="0/2", **kwargs).splits[0]
    assert second.complete and second.written == 24
    assert_groups_identical(tmp_path / "single", sharded, "test-cnn", "train")


KILL_RUNNER = textwrap.dedent("""
    import sys, time, zarr
    # Slow every array write down so the kill lands anywhere, including between a unit's chunks
    # and its completion marker.
    _set = zarr.Array.__setitem__
    def slow(self, *args):
        time.sleep(0.02)
        return _set(self, *args)
    zarr.Array.__setitem__ = slow
    from featurestore.build import build
    build("gratings", "test-cnn", sys.argv[1], splits=["train"], limit_per_class=10, chunk_rows=8,
          batch_size=4, workers=1, quiet=True)
""")


def _markers_done(store: Path) -> int:
    folder = store / "test-cnn" / "train" / "unit_done" / "c"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def test_sigkill_mid_build_then_resume_is_identical(tmp_path):
    clean = tmp_path / "clean"
    build("gratings", "test-cnn", clean, splits=["train"], limit_per_class=10, chunk_rows=8, batch_size=4,
          workers=0, quiet=True)
    store = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = np.random.default_rng(1)
    for attempt, wait_for in enumerate((2, 6)):  # two kills at different points, then a clean finish
        proc = subprocess.Popen([sys.executable, "-c", KILL_RUNNER, str(store)], cwd=REPO, env=env,
                                start_new_session=True, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _markers_done(store) < wait_for:
            assert proc.poll() is None, f"runner ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "build made no progress"
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.1)))
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its DataLoader worker
        proc.wait()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        done = _markers_done(store)
        assert wait_for <= done < 13, f"attempt {attempt}: {done} units done"
    group = zarr.open_group(str(store), mode="r")["test-cnn"]["train"]
    assert group.attrs["complete"] is False
    report = build("gratings", "test-cnn", store, splits=["train"], limit_per_class=10, batch_size=4,
                   workers=0, quiet=True)  # chunk_rows taken from the store
    assert report.splits[0].complete and 0 < report.splits[0].written < 100
    assert_groups_identical(clean, store, "test-cnn", "train")
