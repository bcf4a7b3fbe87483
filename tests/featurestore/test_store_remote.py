"""Stores on fsspec URLs, with fsspec's in-process memory:// filesystem standing in for an object store
(zarr FsspecStore, no network): build, info, read back, resume, refusals; file:// URLs are local stores."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
import zarr.storage
from typer.testing import CliRunner

from cli.fs import app
from featurestore.build import build
from featurestore.errors import StoreError
from featurestore.info import store_info
from featurestore.store import FeatureStore, store_location

OPTIONS = dict(splits=["train"], limit_per_class=4, chunk_rows=16, batch_size=8, workers=0, quiet=True)
CLI_BUILD = ["build", "gratings", "--backbone", "test-cnn", "--split", "train", "--limit-per-class", "4",
             "--chunk-rows", "16", "--batch-size", "8", "--workers", "0", "--quiet"]
MEMORY = fsspec.filesystem("memory")


@pytest.fixture
def memory_url():
    """A fresh memory:// prefix, removed afterwards (the memory filesystem is global to the process)."""
    prefix = f"probe-distill-tests/{uuid.uuid4().hex}"
    yield f"memory://{prefix}/fs"
    if MEMORY.exists(prefix):
        MEMORY.rm(prefix, recursive=True)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("local") / "fs"
    build("gratings", "test-cnn", store, views=2, **OPTIONS)
    return store


def memory_objects(url: str) -> dict[str, bytes]:
    """Every object under a memory:// URL, by key relative to it."""
    root = MEMORY._strip_protocol(url).rstrip("/")  # "memory://a/b" -> "/a/b"
    if not MEMORY.exists(root):
        return {}
    return {path[len(root) + 1:]: MEMORY.cat_file(path) for path in MEMORY.find(root)}


def local_files(path: Path) -> dict[str, bytes]:
    """Every file of a local store except hidden ones: a local build's lock (`.locks/`) has no
    counterpart in an fsspec store, which is never locked."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)}


def assert_same_arrays(a: zarr.Group, b: zarr.Group) -> None:
    ga, gb = a["test-cnn"]["train"], b["test-cnn"]["train"]
    names = sorted(name for name, _ in ga.arrays())
    assert names == sorted(name for name, _ in gb.arrays()) and "features" in names
    for name in names:
        x, y = ga[name][:], gb[name][:]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert (x.tobytes() == y.tobytes()) if x.dtype.kind in "fiu" else (x.tolist() == y.tolist()), name
    assert dict(ga.attrs) == dict(gb.attrs)


def open_memory_group(url: str) -> zarr.Group:
    return zarr.open_group(store=zarr.storage.FsspecStore.from_url(url, read_only=True), mode="r")


def test_cli_build_info_and_reader_on_a_memory_store_match_a_local_store(local_store, memory_url):
    runner = CliRunner()
    result = runner.invoke(app, [*CLI_BUILD, "--views", "2", "--store", memory_url])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "test-cnn/train: complete, 40 rows (40 computed now)"

    # Same format as a local store: the same keys, byte for byte the same array chunks and metadata.
    objects, files = memory_objects(memory_url), local_files(local_store)
    assert sorted(objects) == sorted(files)
    assert_same_arrays(open_memory_group(memory_url), zarr.open_group(str(local_store), mode="r"))

    info = json.loads(runner.invoke(app, ["info", "--store", memory_url, "--json"]).stdout)
    assert info["path"] == memory_url and info["dataset"]["name"] == "gratings"
    split = info["backbones"]["test-cnn"]["splits"]["train"]
    assert (split["n"], split["dim"], split["views"], split["complete"]) == (40, 24, 2, True)
    assert info["size_bytes"] == sum(len(v) for v in objects.values())
    assert split["size_bytes"] == sum(len(v) for k, v in objects.items() if k.startswith("test-cnn/train/"))
    local_info = store_info(local_store)
    assert info["size_bytes"] == local_info["size_bytes"]
    text = runner.invoke(app, ["info", "--store", memory_url])
    assert text.exit_code == 0 and memory_url in text.stdout and "test-cnn" in text.stdout

    remote = FeatureStore.open(memory_url).split("test-cnn", "train")
    local = FeatureStore.open(local_store).split("test-cnn", "train")
    for view in (0, 1, "all"):
        r, loc = remote.load(view=view), local.load(view=view)
        assert r.features.numpy().tobytes() == loc.features.numpy().tobytes()
        assert r.labels.tolist() == loc.labels.tolist() and r.rows.tolist() == loc.rows.tolist()
    assert remote.sample_ids() == local.sample_ids()
    np.testing.assert_array_equal(remote.class_mean(), local.class_mean())
    np.testing.assert_array_equal(remote.class_sq_mean(), local.class_sq_mean())
    assert remote.class_count().tolist() == [4] * 10


def test_resume_on_a_memory_store(local_store, memory_url):
    first = build("gratings", "test-cnn", memory_url, views=2, shard="0/2", **OPTIONS).splits[0]
    assert not first.complete and (first.units_done, first.units_total, first.written) == (1, 3, 16)
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(memory_url).split("test-cnn", "train")
    second = build("gratings", "test-cnn", memory_url, views=2, **OPTIONS).splits[0]
    assert second.complete and second.written == 24  # only the two unfinished units
    assert_same_arrays(open_memory_group(memory_url), zarr.open_group(str(local_store), mode="r"))
    assert build("gratings", "test-cnn", memory_url, views=2, **OPTIONS).splits[0].already_complete


def test_refused_builds_leave_a_memory_store_untouched(memory_url):
    runner = CliRunner()
    # Something that is not a feature store under the URL.
    root = MEMORY._strip_protocol(memory_url)
    MEMORY.pipe_file(f"{root}/holiday.txt", b"not a store")
    before = memory_objects(memory_url)
    for args in ([*CLI_BUILD, "--store", memory_url], ["info", "--store", memory_url]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1
        assert "not a feature store" in result.stderr
    assert memory_objects(memory_url) == before

    # A store built with other options.
    MEMORY.rm(f"{root}/holiday.txt")
    assert runner.invoke(app, [*CLI_BUILD, "--store", memory_url]).exit_code == 0
    before = memory_objects(memory_url)
    result = runner.invoke(app, [*CLI_BUILD, "--store", memory_url, "--views", "3"])
    assert result.exit_code == 2 and "--views" in result.stderr
    assert memory_objects(memory_url) == before

    missing = runner.invoke(app, ["info", "--store", memory_url + "-missing"])
    assert missing.exit_code == 2 and "no feature store at memory://" in missing.stderr


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs installed: would reach the network")
def test_url_without_its_fsspec_backend_is_one_clear_error():
    result = CliRunner().invoke(app, [*CLI_BUILD, "--store", "s3://some-bucket/fs"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "s3fs" in result.stderr and "Traceback" not in result.output
    with pytest.raises(StoreError, match="not known"):
        FeatureStore.open("nosuchprotocol://bucket/fs")


def test_file_urls_are_local_stores_and_path_wrapped_urls_still_work(local_store, memory_url, tmp_path):
    folder = tmp_path / "via-url"
    location = store_location(f"file://{folder}")
    assert location.is_local and location.local_path == folder
    build("gratings", "test-cnn", f"file://{folder}", views=2, **OPTIONS)
    assert (folder / "zarr.json").is_file()
    assert local_files(folder).keys() == local_files(local_store).keys()
    # Path("memory://x/fs") is "memory:/x/fs" (pathlib collapses //); readers get such Paths from callers.
    build("gratings", "test-cnn", memory_url, views=2, **OPTIONS)
    wrapped = FeatureStore.open(Path(memory_url))
    assert wrapped.path == memory_url and wrapped.location.is_local is False
    assert wrapped.split("test-cnn", "train").n == 40
