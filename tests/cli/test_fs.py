"""`fs` command line: exit codes, one-line errors, and that refused commands leave the store untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.fs import app

REPO = Path(__file__).resolve().parents[2]
BUILD = ["build", "gratings", "--backbone", "test-cnn", "--limit-per-class", "4", "--split", "train",
         "--chunk-rows", "16", "--batch-size", "8", "--workers", "0", "--quiet"]


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def built_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("cli") / "store"
    result = run(*BUILD, "--store", store)
    assert result.exit_code == 0, result.output
    assert "test-cnn/train: complete, 40 rows (40 computed now)" in result.stdout
    return store


def test_info_json_describes_the_store(built_store):
    result = run("info", "--store", built_store, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["schema_version"] == 1 and info["dataset"]["name"] == "gratings"
    assert info["num_classes"] == 10
    split = info["backbones"]["test-cnn"]["splits"]["train"]
    assert split["limit_per_class"] == 4 and split["greyscale"] is False  # limits are per split
    assert (split["n"], split["dim"], split["views"], split["dtype"]) == (40, 24, 1, "float16")
    assert split["complete"] and (split["units_done"], split["units_total"]) == (3, 3)
    assert split["num_skipped"] == 0 and split["skipped"] == []
    assert info["backbones"]["test-cnn"]["image_size"] == 32
    # Features alone are 40 x 24 fp16 = 1920 bytes; the total counts every file.
    assert info["size_bytes"] > split["size_bytes"] > 1920
    text = run("info", "--store", built_store)
    assert text.exit_code == 0 and "test-cnn" in text.stdout and "train" in text.stdout


def test_second_build_says_already_complete_and_writes_nothing(built_store, dir_digest):
    before = dir_digest(built_store)
    result = run(*BUILD, "--store", built_store)
    assert result.exit_code == 0, result.output
    assert "test-cnn/train: already complete (40 rows), nothing to do" in result.stdout
    assert dir_digest(built_store) == before


@pytest.mark.parametrize("args,fragments", [
    (["build", "gratings", "--backbone", "no-such-net"], ["unknown backbone 'no-such-net'"]),
    (["build", "no-such-data", "--backbone", "test-cnn"], ["unknown dataset 'no-such-data'"]),
    (["build", "imagefolder", "--backbone", "test-cnn", "--data-root", "/nonexistent/imgs"], ["does not exist"]),
    (["build", "gratings", "--backbone", "test-cnn", "--shard", "2/2"], ["--shard 2/2"]),
])
def test_bad_names_and_roots_fail_in_one_line_and_create_nothing(tmp_path, args, fragments):
    store = tmp_path / "store"
    result = run(*args, "--store", store, "--quiet")
    assert_one_line_error(result, *fragments)
    assert not store.exists()


def test_incompatible_schema_version_is_refused_untouched(tmp_path, dir_digest):
    store = tmp_path / "store"
    assert run(*BUILD, "--store", store).exit_code == 0
    meta_file = store / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["schema_version"] = 99
    meta_file.write_text(json.dumps(meta))
    before = dir_digest(store)
    assert_one_line_error(run(*BUILD, "--store", store), "schema version 99", "reads version 1")
    assert_one_line_error(run("info", "--store", store), "schema version 99")
    assert dir_digest(store) == before
    # Issue 20, defect 10: the string "1" read "has schema version 1, ... reads version 1".
    meta["attributes"]["schema_version"] = "1"
    meta_file.write_text(json.dumps(meta))
    assert_one_line_error(run("info", "--store", store), "has schema version '1' (a string)",
                          "reads version 1")


def test_non_store_paths_are_refused_untouched(tmp_path, dir_digest):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.txt").write_text("not a store")
    before = dir_digest(folder)
    assert_one_line_error(run(*BUILD, "--store", folder), "not a feature store")
    assert_one_line_error(run("info", "--store", folder), "not a feature store")
    assert_one_line_error(run("info", "--store", tmp_path / "missing"), "no feature store")
    assert dir_digest(folder) == before
    file_path = tmp_path / "file.zarr"
    file_path.write_text("x")
    assert_one_line_error(run(*BUILD, "--store", file_path), "is a file")


def test_backbone_mismatch_under_same_name_is_refused(built_store, tmp_path, dir_digest):
    from featurestore.backbones import create_backbone

    weights = tmp_path / "retrained.pt"
    state = create_backbone("test-cnn").model.state_dict()
    torch.save({k: v * 1.5 for k, v in state.items()}, weights)
    before = dir_digest(built_store)
    assert_one_line_error(run(*BUILD, "--store", built_store, "--weights", weights), "different backbone")
    assert_one_line_error(run(*BUILD, "--store", built_store, "--image-size", "40"), "built at 32 px")
    assert dir_digest(built_store) == before


def test_backbones_and_datasets_listings():
    result = run("backbones")
    assert result.exit_code == 0
    assert "efficientnet-lite0" in result.stdout and "test-cnn" not in result.stdout
    assert "test-cnn" in run("backbones", "--all").stdout
    datasets = run("datasets")
    assert datasets.exit_code == 0
    for name in ("imagenet", "imagefolder", "fashion-mnist", "gratings"):
        assert name in datasets.stdout


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "cli.fs", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("build", "info", "verify", "backbones", "datasets"):
        assert command in result.stdout


def test_build_reports_skipped_files_and_empty_classes(tmp_path, image_folder):
    store = tmp_path / "store"
    result = run("build", "imagefolder", "--backbone", "test-cnn", "--data-root", image_folder, "--store", store,
                 "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    assert "test-cnn/train: complete, 17 rows (17 computed now), 2 skipped" in result.stdout
    assert "warning: no usable images in class(es) d" in result.stderr
    info = run("info", "--store", store)
    assert "skipped test-cnn/train: train/b/broken.jpg: not an image" in info.stdout
    assert "empty classes in test-cnn/train: d" in info.stdout
