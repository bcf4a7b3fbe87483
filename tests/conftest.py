"""Shared test fixtures (kept small): directory digests, a tiny image-folder dataset on disk, and tiny feature
stores of the `gratings` dataset."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def tree_digest(path: str | os.PathLike) -> str:
    """sha256 over every file's relative path and bytes under `path` ('' if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return ""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(file.relative_to(path).as_posix().encode())
        h.update(file.read_bytes())
    return h.hexdigest()


@pytest.fixture
def dir_digest():
    return tree_digest


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ROOT/train/<class>/*.png for 3 classes x 5 images (+ one corrupt and one truncated file in
    class 'b', and an empty class folder 'd'); deterministic pixels."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b", "c"]):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(5):
            pixels = (rng.random((20 + 3 * i, 24, 3)) * 80 + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i}.png")
    (root / "train" / "b" / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = (root / "train" / "c" / "img0.png").read_bytes()
    (root / "train" / "c" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "d").mkdir()
    return root


@pytest.fixture(scope="session")
def make_gratings_store(tmp_path_factory) -> Callable[..., Path]:
    """`make_gratings_store(*backbones, **build options)`: a new tiny store of the `gratings` dataset (no
    files to read; in-process loading, no progress bar) in its own temp folder, each backbone built in the
    order given (default test-cnn). Each call builds afresh, so a module that damages its store harms no
    other module; a module-scoped fixture calls it once for the module's tests."""
    from featurestore.build import build

    def make(*backbones: str, **options) -> Path:
        path = tmp_path_factory.mktemp("store") / "fs"
        for backbone in backbones or ("test-cnn",):
            build("gratings", backbone, path, workers=0, quiet=True, **options)
        return path

    return make
