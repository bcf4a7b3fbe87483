"""engine.evaluate: feature consistency with the store, determinism, the full-data probe, outputs, and
`engine eval` errors (the probe trainer itself: test_probe.py)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.engine import app
from engine.evaluate import FULL_BATCH, ProbeRecipe, evaluate, evaluate_full, write_eval_outputs
from engine.imagesets import embed_views
from engine.imagefolder import class_folder_names, write_imagefolder
from featurestore.build import build
from featurestore.datasets import canonical_image
from featurestore.store import FeatureStore
from tests.engine.test_probe import reference_probe


# ---------------------------------------------------------------------------------------------------
# On a tiny store


@pytest.fixture(scope="module")
def tiny_store(make_gratings_store):
    return FeatureStore.open(make_gratings_store("test-vit", "test-cnn", limit_per_class=4))


@pytest.fixture(scope="module")
def image_set(tiny_store, tmp_path_factory):
    """One real training image per class, written as a set (canonical images at 36 px)."""
    split = tiny_store.split("test-vit", "train")
    ds = split.open_dataset()
    rows = [int(r) for r in torch.arange(0, split.n, 4)]  # classes are stored class by class, 4 each
    images = torch.stack([canonical_image(ds.load_image(r), split.resize_size) for r in rows])
    labels = torch.tensor([int(ds.labels[r]) for r in rows])
    out = tmp_path_factory.mktemp("sets") / "real1"
    write_imagefolder(out / "images", images, labels, tiny_store.class_names)
    return out, rows


def test_eval_features_match_stored_features(tiny_store, image_set):
    # The centre-crop view of a canonical image through the rebuilt backbone must reproduce the store's
    # feature of that image: evaluation trains and tests in one feature space.
    _, rows = image_set
    for bb in ("test-vit", "test-cnn"):
        split = tiny_store.split(bb, "train")
        model = split.open_backbone("cpu")
        ds = split.open_dataset()
        images = torch.stack([canonical_image(ds.load_image(r), split.resize_size) for r in rows])
        ours = embed_views(model, images, 1, None)[0]
        stored = split.load(view=0).features[rows]
        torch.testing.assert_close(ours, stored, rtol=2e-3, atol=2e-3)  # the store keeps fp16


def test_evaluate_end_to_end_deterministic(tiny_store, image_set, tmp_path):
    path, _ = image_set
    kwargs = dict(seeds=2, epochs=30, views=3, full=True, full_epochs=5, device="cpu", quiet=True)
    first = evaluate(tiny_store, {"real1": path}, ["test-vit", "test-cnn"], **kwargs)
    second = evaluate(tiny_store, {"real1": path}, ["test-vit", "test-cnn"], **kwargs)
    assert list(first.rows) == ["real1", "full"]
    for row in first.rows:
        for bb in ("test-vit", "test-cnn"):
            assert first.rows[row][bb].top1 == second.rows[row][bb].top1
            assert first.rows[row][bb].top5 == second.rows[row][bb].top5
            assert len(first.rows[row][bb].top1) == 2
            assert all(0 <= a <= b <= 100 for a, b in zip(first.rows[row][bb].top1, first.rows[row][bb].top5))
    assert first.rows["real1"]["test-vit"].num_images == 10

    json_path, md_path = write_eval_outputs(first, tmp_path / "ev")
    data = json.loads(json_path.read_text())
    cell = data["results"]["real1"]["test-cnn"]
    assert cell["top1"] == first.rows["real1"]["test-cnn"].top1 and cell["seeds"] == [0, 1]
    assert data["config"]["epochs"] == 30 and data["config"]["views"] == 3
    md = md_path.read_text()
    assert "| set | test-vit | test-cnn |" in md
    assert f"| real1 | {first.cell_text('real1', 'test-vit')} |" in md


def test_evaluate_full_matches_reference(tiny_store):
    cell = evaluate_full(tiny_store, "test-cnn", epochs=60, seeds=[3], device="cpu", quiet=True)
    train = tiny_store.split("test-cnn", "train").load()
    val = tiny_store.split("test-cnn", "val").load()
    head = reference_probe(train.features, train.labels, 10, ProbeRecipe(epochs=60, batch_size=FULL_BATCH),
                           torch.Generator().manual_seed(3))
    top5 = head(val.features).topk(5, dim=1).indices
    assert cell.top1 == [100.0 * int((top5[:, 0] == val.labels).sum()) / 40]
    assert cell.top5 == [100.0 * int((top5 == val.labels[:, None]).any(1).sum()) / 40]
    assert cell.num_images == 40


# ---------------------------------------------------------------------------------------------------
# CLI


def _run(args):
    return CliRunner().invoke(app, args)


def test_cli_eval_writes_table(tiny_store, image_set, tmp_path):
    path, _ = image_set
    res = _run(["eval", "--store", str(tiny_store.path), "--images", str(path), "--backbone", "test-cnn",
                "--seeds", "2", "--epochs", "5", "--views", "2", "--full", "--full-epochs", "2",
                "--out", str(tmp_path / "ev"), "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "| real1 |" in res.output and "| full |" in res.output
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["config"]["seeds"] == [0, 1]


def test_cli_eval_errors(tiny_store, image_set, tmp_path):
    path, _ = image_set
    base = ["eval", "--store", str(tiny_store.path), "--epochs", "2", "--seeds", "1", "--quiet"]
    # Missing images dir.
    res = _run(base + ["--images", str(tmp_path / "nope"), "--backbone", "test-cnn"])
    assert res.exit_code == 2 and "no such directory" in res.output
    # Empty images dir.
    (tmp_path / "empty").mkdir()
    res = _run(base + ["--images", str(tmp_path / "empty"), "--backbone", "test-cnn"])
    assert res.exit_code == 2 and "no class folders" in res.output
    # A class folder the store does not know.
    bad = tmp_path / "bad"
    write_imagefolder(bad, torch.rand(1, 3, 8, 8), [0], ["not-a-class"])
    res = _run(base + ["--images", str(bad), "--backbone", "test-cnn"])
    assert res.exit_code == 2 and "not-a-class" in res.output and class_folder_names(tiny_store.class_names)[0] in res.output
    # A backbone the store does not hold.
    res = _run(base + ["--images", str(path), "--backbone", "efficientnet-lite0"])
    assert res.exit_code == 2 and "efficientnet-lite0" in res.output and "test-cnn/train" in res.output
    # Nothing to evaluate.
    res = _run(base + ["--backbone", "test-cnn"])
    assert res.exit_code == 2 and "nothing to evaluate" in res.output
    for r in (res,):
        assert "Traceback" not in r.output


def test_cli_eval_store_without_val(tmp_path, image_set):
    path, _ = image_set
    store = tmp_path / "trainonly"
    build("gratings", "test-cnn", store, splits=["train"], limit_per_class=1, workers=0, quiet=True)
    res = _run(["eval", "--store", str(store), "--images", str(path), "--backbone", "test-cnn", "--quiet"])
    assert res.exit_code == 2 and "test-cnn/val" in res.output
    assert not (path / "eval").exists()  # a refused command writes nothing


def test_eval_md_table_survives_set_names_with_newlines_and_bars():
    """Issue 20, defect 10: a set name with a newline (or a '|') broke eval.md's table rows."""
    from engine.evaluate import CellResult, EvalResult

    cell = CellResult(seeds=[0], top1=[50.0], top5=[90.0], num_images=10)
    result = EvalResult(backbones=["test-cnn"], rows={"odd\nname|x": {"test-cnn": cell}},
                        config={"image_sets": {"odd\nname|x": "/tmp/odd\nname"}})
    lines = result.to_markdown().splitlines()
    rows = [line for line in lines if line.startswith("| odd")]
    assert rows == ["| odd\\x0aname\\|x | 50.0 ± 0.0 |", "| odd\\x0aname\\|x | 90.0 ± 0.0 |"], lines
    assert all(not line.startswith("name") for line in lines)
