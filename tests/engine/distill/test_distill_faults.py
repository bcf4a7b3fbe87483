"""Failure behaviour of the engine (distill, eval, baseline): hostile checkpoints, damaged or changed
stores, concurrent runs, signals, bad options, long names, non-terminal logs. Each test fails on the
engine as it was before these defects were fixed (the docstrings say how)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import engine.objectives as objectives
from cli.engine import app
from engine.distill import DistillConfig, DistillError, NonFiniteLossError, distill
from engine.imagefolder import MAX_FOLDER_CHARS, read_imagefolder
from engine.objectives import LGMObjective
from engine.real import ImageRealSource
from featurestore.build import build
from featurestore.runtime import exclusive_lock
from featurestore.store import FeatureStore

BACKBONE = "test-cnn"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def store(make_gratings_store) -> Path:
    return make_gratings_store(BACKBONE, limit_per_class=4, dtype="fp32")


def _config(store: Path, out: Path, **kw) -> DistillConfig:
    # test-cnn's 36 px pyramid has 7 levels: a level every step completes it at step 7.
    base = dict(store=str(store), backbone=BACKBONE, out=str(out), ipc=1, steps=7, augs=1, grow_every=1,
                checkpoint_every=1, quiet=True, device="cpu")
    base.update(kw)
    return DistillConfig(**base)


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line_error(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def _nan_on_call(monkeypatch, call: int) -> None:
    original = LGMObjective.loss
    count = {"n": 0}

    def patched(self, *args, **kwargs):
        count["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if count["n"] == call else loss

    monkeypatch.setattr(objectives.LGMObjective, "loss", patched)


def _solid_folder(root: Path, colours: dict[str, tuple[int, int, int]], per_class: int = 3) -> Path:
    for name, colour in colours.items():
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), colour).save(folder / f"img{i + 1}.png")
    return root


def _solid_store(tmp_path: Path) -> tuple[Path, Path]:
    """(source folder of red class a / blue class b, the train split's store built from it)."""
    root = _solid_folder(tmp_path / "data", {"a": (255, 0, 0), "b": (0, 0, 255)})
    path = tmp_path / "fs"
    build("imagefolder", BACKBONE, path, data_root=root, dtype="fp32", workers=0, quiet=True, splits=["train"])
    return root, path


def _rebuild(root: Path, path: Path) -> None:
    """The store built again at the same path from the (changed) source folder."""
    import shutil

    shutil.rmtree(path)
    build("imagefolder", BACKBONE, path, data_root=root, dtype="fp32", workers=0, quiet=True, splits=["train"])


# ----------------------------------------------------------------------------------------------------
# checkpoints


class _Payload:
    """Unpickling this runs Path.touch(marker): what a crafted checkpoint could do with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_runs_no_code(store, tmp_path):
    """Before: torch.load(weights_only=False) ran the payload, then said 'not a checkpoint'."""
    out, marker = tmp_path / "out", tmp_path / "payload-ran"
    out.mkdir()
    torch.save({"format": 2, "step": 1, "payload": _Payload(marker)}, out / "checkpoint.pt")
    line = _one_line_error(_cli("distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out),
                                "--resume", "--quiet", "--device", "cpu"))
    assert "not a readable probe-distill checkpoint" in line
    assert not marker.exists()


def test_a_foreign_checkpoint_dict_gives_one_line(store, tmp_path):
    """Before: a dict of the right format but wrong content raised KeyError/TypeError (a traceback)."""
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"format": 2, "step": "three", "run": {}}, out / "checkpoint.pt")
    line = _one_line_error(_cli("distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out),
                                "--resume", "--quiet", "--device", "cpu"))
    assert "is damaged" in line


def test_nan_advice_works_lr_may_change_on_resume(store, tmp_path, monkeypatch):
    """Before: the message said 'lower --lr and rerun with --resume', but resume refused a changed lr."""
    out = tmp_path / "nan"
    with monkeypatch.context() as m:
        _nan_on_call(m, 3)
        with pytest.raises(NonFiniteLossError, match="rerun with --resume and a lower --lr") as info:
            distill(_config(store, out, steps=8, lr=2e-3))
    assert "step 3" in str(info.value)
    resumed = distill(_config(store, out, steps=8, lr=1e-4, resume=True))
    assert resumed.steps_done == 8 and resumed.resumed_from == 2
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"]["lr_history"] == [{"from_step": 0, "lr": 2e-3}, {"from_step": 2, "lr": 1e-4}]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 1e-4


def test_nan_before_any_checkpoint_restarts_with_the_same_command(store, tmp_path, monkeypatch):
    """Before: the same command said 'not empty' and --resume said 'no checkpoint': a stuck directory."""
    out = tmp_path / "early"
    with monkeypatch.context() as m:
        _nan_on_call(m, 1)
        with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet: rerun the same command"):
            distill(_config(store, out))
    assert (out / "config.json").is_file() and not (out / "checkpoint.pt").exists()
    assert distill(_config(store, out)).steps_done == 7
    # A run killed before its first checkpoint: --resume starts it again too.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    (killed / "metrics.jsonl").write_text("")
    assert distill(_config(store, killed, resume=True)).steps_done == 7


def test_resume_refuses_a_store_rebuilt_from_other_images(tmp_path):
    """Before: the checkpoint recorded only the store's path; a rebuilt store was silently mixed in."""
    path = tmp_path / "fs"
    build("gratings", BACKBONE, path, limit_per_class=4, dtype="fp32", workers=0, quiet=True, splits=["train"])
    out = tmp_path / "run"
    distill(_config(path, out, steps=7))
    import shutil

    shutil.rmtree(path)
    build("gratings", BACKBONE, path, limit_per_class=3, dtype="fp32", workers=0, quiet=True, splits=["train"])
    with pytest.raises(DistillError, match="changed since the checkpoint"):
        distill(_config(path, out, steps=8, resume=True))


def test_resume_refuses_a_store_of_as_many_other_images(tmp_path):
    """The same row count and labels, other images (other sample ids): a check of the row count alone would
    let this checkpoint continue on a different dataset."""
    root, path = _solid_store(tmp_path)
    out = tmp_path / "run"
    distill(_config(path, out, steps=7, grow_every=1))
    for image in sorted(root.glob("train/*/*.png")):
        image.rename(image.with_name(image.name.replace("img", "other")))
    _rebuild(root, path)
    assert FeatureStore.open(path).split(BACKBONE, "train").n == 6
    with pytest.raises(DistillError, match="changed since the checkpoint"):
        distill(_config(path, out, steps=8, resume=True))


def test_steps_may_grow_on_resume_under_grow_every_auto(store, tmp_path):
    """Issue 20, defect 5: extending a finished run with a larger --steps and --resume was refused under
    --grow-every auto ("--grow-every 1 -> 2"), although the README says --steps may grow: the auto value
    was derived from the new --steps. It is fixed at the run's start (recorded in the checkpoint and
    config.json): the extension is the straight run with that schedule, bit for bit."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    grows = dict(init="zero")  # a growing pyramid: the default --init centroid starts it complete
    first = distill(_config(store, out, steps=18, grow_every="auto", checkpoint_every=6, **grows))
    extended = distill(_config(store, out, steps=36, grow_every="auto", checkpoint_every=6, resume=True, **grows))
    assert json.loads((out / "config.json").read_text())["resolved"]["grow_every"] == 1
    whole = distill(_config(store, straight, steps=36, grow_every=1, checkpoint_every=6, **grows))
    assert first.steps_done == 18 and extended.steps_done == 36
    assert torch.equal(extended.images, whole.images) and extended.losses == whole.losses


def test_resume_refuses_a_store_rebuilt_from_other_pixels_under_the_same_names(tmp_path):
    """Issue 20, defect 2: the run identity was the sample ids and labels only, so a store rebuilt at the
    same path from the same file names with other pixels was resumed, mixing two datasets. A digest of
    the stored features (their chunk checksums, which every read checks) is now part of it."""
    root, path = _solid_store(tmp_path)
    out = tmp_path / "run"
    distill(_config(path, out, steps=7, grow_every=1))
    for image in sorted(root.glob("train/*/*.png")):
        Image.new("RGB", (40, 40), (0, 200, 0)).save(image)
    _rebuild(root, path)
    with pytest.raises(DistillError, match="changed since the checkpoint"):
        distill(_config(path, out, steps=8, resume=True))


# ----------------------------------------------------------------------------------------------------
# real images found by sample id


@pytest.fixture()
def shifted_folder(tmp_path) -> tuple[Path, Path]:
    """A store of red class a / blue class b, then a green image inserted first into class a: every
    position after it in the source moves by one."""
    root = _solid_folder(tmp_path / "data", {"a": (255, 0, 0), "b": (0, 0, 255)})
    store = tmp_path / "fs"
    build("imagefolder", BACKBONE, store, data_root=root, dtype="fp32", workers=0, quiet=True)
    Image.new("RGB", (40, 40), (0, 255, 0)).save(root / "train" / "a" / "img0.png")
    return root, store


def test_init_real_finds_images_by_sample_id(shifted_folder, tmp_path):
    """Before: rows were positions, so class b started from a red class-a image."""
    _, store = shifted_folder
    result = distill(_config(store, tmp_path / "run", init="real", param="pixels", steps=1, lr=1e-12))
    means = result.images.mean(dim=(2, 3))  # [class, RGB]
    assert means[0, 0] > 0.9 and means[0, 1] < 0.1  # class a: red (not the new green image)
    assert means[1, 2] > 0.9 and means[1, 0] < 0.1  # class b: blue


def test_init_centroid_starts_from_the_centroid_baseline_images(store, tmp_path):
    """--init centroid: each class starts from the real image `engine baseline --kind centroid` picks (the
    stored feature nearest the class mean), found by sample id; a 1-step run at a vanishing lr keeps it."""
    from engine.baselines import make_baseline

    baseline = make_baseline(str(store), BACKBONE, "centroid", tmp_path / "centroid", quiet=True)
    random_start = distill(_config(store, tmp_path / "real", init="real", param="pixels", steps=1, lr=1e-12))
    result = distill(_config(store, tmp_path / "run", init="centroid", param="pixels", steps=1, lr=1e-12))
    picked, labels, _ = read_imagefolder(tmp_path / "centroid" / "images", result.class_names)
    order = torch.argsort(labels, stable=True)  # ipc 1: one image per class, in class order like the run's
    picked = picked[order]
    assert torch.equal(labels[order], result.labels)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["arguments"]["init"] == "centroid"
    assert baseline["num_images"] == result.images.shape[0]
    # The baseline's PNGs are 8-bit: the same pixels up to rounding (and the sigmoid's clamp at 0 and 1).
    assert (result.images - picked).abs().max() < 2 / 255
    assert (random_start.images - picked).abs().max() > 0.1  # a random real image is another picture


def test_default_init_without_the_source_images_is_one_line_naming_init_zero(tmp_path):
    """--init centroid (the default) reads C x ipc real images once: a store whose source folder is gone
    gives one `error:` line that names the way out (--init zero), exit 2, and --out stays empty."""
    import shutil

    root, store = _solid_store(tmp_path)
    shutil.rmtree(root)
    out = tmp_path / "run"
    line = _one_line_error(_cli("distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out),
                                "--steps", "2", "--augs", "1", "--quiet", "--device", "cpu"))
    assert "--init centroid" in line and "--init zero" in line
    assert not out.exists() or not any(out.iterdir())
    assert distill(_config(store, out, init="zero")).steps_done == 7  # the way out works


def test_end_to_end_real_side_finds_images_by_sample_id(shifted_folder):
    _, store = shifted_folder
    split = FeatureStore.open(store).split(BACKBONE, "train")
    source = ImageRealSource.from_split(split, split.open_backbone("cpu"), batch=None, augment_images=False)
    features, labels = source.sample(torch.Generator().manual_seed(0))
    stored = split.load(view=0)
    assert torch.equal(labels, stored.labels)
    torch.testing.assert_close(features, stored.features, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# concurrent runs, signals, early deaths


def test_a_second_run_into_a_held_out_dir_is_refused_naming_the_holder(store, tmp_path):
    """Before: both runs 'succeeded', interleaving metrics and losing one run's results."""
    out = tmp_path / "shared"
    with exclusive_lock(out, "output directory"):
        line = _one_line_error(_cli("distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out),
                                    "--steps", "7", "--quiet", "--device", "cpu"))
        assert "in use by another run" in line and f"pid {os.getpid()}" in line
        assert not (out / "config.json").exists()
    assert distill(_config(store, out)).steps_done == 7  # the lock dies with its holder


def test_sigterm_saves_a_checkpoint_and_resume_continues(store, tmp_path):
    """Before: SIGTERM (what schedulers send) killed a single-process run without a checkpoint."""
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "cli.engine", "distill", "--store", str(store), "--backbone", BACKBONE, "--out",
           str(out), "--steps", "100000", "--augs", "1", "--param", "pixels", "--checkpoint-every", "100000",
           "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 600  # generous: a loaded 2-core machine starts slowly
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"the run did not reach step 3: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "checkpoint saved" in err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 3
    resumed = distill(_config(store, out, steps=step + 1, param="pixels", checkpoint_every=100000, resume=True))
    assert resumed.resumed_from == step and resumed.steps_done == step + 1


# ----------------------------------------------------------------------------------------------------
# bad options and degenerate stores: one line, before any heavy work


def test_impossible_options_are_refused_in_one_line(store, tmp_path, monkeypatch):
    """Before: --head-std inf was accepted, --ipc 100000 began allocating ~12 GB, and --full-epochs 0
    reported an untrained probe as the upper bound."""
    common = ["--store", str(store), "--backbone", BACKBONE, "--quiet", "--device", "cpu"]
    assert "--head-std" in _one_line_error(_cli("distill", *common, "--out", str(tmp_path / "a"), "--head-std", "inf"))
    import featurestore.backbones as backbones

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone must not be loaded for a run refused up front")

    with monkeypatch.context() as m:
        m.setattr(backbones, "create_backbone", no_backbone)
        line = _one_line_error(_cli("distill", *common, "--out", str(tmp_path / "b"), "--ipc", "100000000"))
        assert "needs about" in line and "lower --ipc" in line
        blocker = tmp_path / "file"
        blocker.write_text("x")
        line = _one_line_error(_cli("distill", *common, "--out", str(blocker / "out")))
        assert "is a file" in line
    assert "--full-epochs" in _one_line_error(_cli("eval", "--store", str(store), "--backbone", BACKBONE, "--full",
                                                   "--full-epochs", "0", "--quiet", "--device", "cpu"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


HUGE = "99999999999999999999"


@pytest.mark.parametrize("option,value,fragment", [
    ("--augs", HUGE, "--augs must be at most 2147483647"),
    ("--ipc", HUGE, "--ipc must be at most 2147483647"),
    ("--steps", HUGE, "--steps must be at most 2147483647"),
    ("--checkpoint-every", HUGE, "--checkpoint-every must be at most 2147483647"),
    ("--eval-every", HUGE, "--eval-every must be at most 2147483647"),
    ("--real-batch", HUGE, "--real-batch must be at most 2147483647"),
    ("--grow-every", HUGE, "--grow-every must be at most 2147483647"),
    ("--chunk", HUGE, "--chunk must be at most 2147483647"),
    ("--seed", HUGE, "--seed must be at most 9223372036854775807"),
    ("--seed", "-1", "--seed must be >= 0"),
    ("--image-size", HUGE, "--image-size must be at most 4096"),
    ("--augs", "1000000000", "lower --augs"),  # within the bound, over the memory: the check --ipc gets
])
def test_every_numeric_distill_option_is_bounded(store, tmp_path, monkeypatch, option, value, fragment):
    """Issue 20, defect 9 (and 6): --augs 99999999999999999999 was an OverflowError traceback; --augs
    1000000000 skipped the memory check that --ipc gets. One line each, before the backbone loads."""
    import featurestore.backbones as backbones

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone must not be loaded for a run refused up front")

    monkeypatch.setattr(backbones, "create_backbone", no_backbone)
    out = tmp_path / "run"
    line = _one_line_error(_cli("distill", "--store", str(store), "--backbone", BACKBONE, "--quiet", "--device", "cpu",
                                "--out", str(out), option, value))
    assert fragment in line
    assert not out.exists()


@pytest.mark.parametrize("command,option,fragment", [
    ("eval", "--seeds", "--seeds must be at most 10000"),
    ("eval", "--epochs", "--epochs must be at most 10000000"),
    ("eval", "--full-epochs", "--full-epochs must be at most 10000000"),
    ("eval", "--views", "--views must be at most 100000"),
    ("baseline", "--ipc", "--ipc must be at most 2147483647"),
    ("baseline", "--seed", "--seed must be in 0..9223372036854775807"),
])
def test_every_numeric_eval_and_baseline_option_is_bounded(store, tmp_path, command, option, fragment):
    """Issue 20, defect 9: eval and baseline counts had no upper bound (--seeds 10^20 builds a list of
    10^20 seeds, --seed 10^20 is an overflow in torch's generator). One line, nothing written."""
    out = tmp_path / "out"
    args = ["--store", str(store), "--backbone", BACKBONE, "--quiet", "--device", "cpu", "--out", str(out)]
    args += ["--full"] if command == "eval" else ["--kind", "random"]
    assert fragment in _one_line_error(_cli(command, *args, option, HUGE))
    assert not out.exists()


def test_out_a_dangling_symlink_is_one_line_before_any_work(store, tmp_path, monkeypatch):
    """Issue 20, defects 6 and 10: --out a dangling symlink was a FileExistsError traceback (distill) and
    failed only after the whole evaluation (eval). One line, up front, naming the link's target."""
    import engine.evaluate as evaluate

    def no_probe(*args, **kwargs):
        raise AssertionError("nothing must be evaluated when --out cannot be written")

    monkeypatch.setattr(evaluate, "evaluate_full", no_probe)
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing" / "target")
    common = ["--store", str(store), "--backbone", BACKBONE, "--quiet", "--device", "cpu", "--out", str(link)]
    for command in (["distill", "--steps", "7"], ["eval", "--full"], ["baseline", "--kind", "random"]):
        line = _one_line_error(_cli(*command, *common))
        assert "is a symbolic link to" in line and "which does not exist" in line, line
    assert link.is_symlink() and not (tmp_path / "missing").exists()


def test_degenerate_stores_give_one_line(tmp_path):
    """Before: a one-class store raised ValueError inside LGM, and a split of only undecodable files
    failed with a traceback in distill, baseline and eval --full."""
    one = _solid_folder(tmp_path / "one", {"only": (10, 200, 30)})
    one_store = tmp_path / "fs-one"
    build("imagefolder", BACKBONE, one_store, data_root=one, dtype="fp32", workers=0, quiet=True)
    line = _one_line_error(_cli("distill", "--store", str(one_store), "--backbone", BACKBONE, "--out",
                                str(tmp_path / "o1"), "--quiet", "--device", "cpu"))
    assert "at least 2 classes" in line

    broken = tmp_path / "broken"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (broken / split / name).mkdir(parents=True)
            (broken / split / name / "x.png").write_bytes(b"not a png")
    broken_store = tmp_path / "fs-broken"
    build("imagefolder", BACKBONE, broken_store, data_root=broken, dtype="fp32", workers=0, quiet=True)
    common = ["--store", str(broken_store), "--backbone", BACKBONE, "--quiet", "--device", "cpu"]
    assert "no usable rows" in _one_line_error(_cli("distill", *common, "--out", str(tmp_path / "o2")))
    assert "no usable rows" in _one_line_error(_cli("baseline", *common, "--kind", "random",
                                                    "--out", str(tmp_path / "o3")))
    assert "no usable rows" in _one_line_error(_cli("eval", *common, "--full", "--full-epochs", "1"))


# ----------------------------------------------------------------------------------------------------
# outputs: long class names, permissions, where eval writes, logs, grids


def test_a_long_class_name_is_capped_up_front(tmp_path):
    """Before: every step ran, then 'File name too long' while writing images/, and nothing was written."""
    root = _solid_folder(tmp_path / "imagenet", {"n001": (200, 0, 0), "n002": (0, 0, 200)})
    long_name = "a very long gloss " * 17  # 306 characters, longer than a file name may be
    (root / "LOC_synset_mapping.txt").write_text(f"n001 {long_name}\nn002 short name\n")
    store = tmp_path / "fs"
    build("imagenet", BACKBONE, store, data_root=root, dtype="fp32", workers=0, quiet=True)
    out = tmp_path / "run"
    result = distill(_config(store, out))
    folders = sorted(p.name for p in (out / "images").iterdir())
    assert all(len(f) <= MAX_FOLDER_CHARS for f in folders) and len(folders) == 2
    images, labels, _ = read_imagefolder(out / "images", result.class_names)
    assert labels.tolist() == [0, 1]
    assert json.loads((out / "config.json").read_text())["class_names"][0] == long_name.strip()


def test_outputs_are_not_private(store, tmp_path):
    """Before: images/ was created by mkdtemp with mode 0700."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        distill(_config(store, out))
    finally:
        os.umask(old)
    assert (out / "images").stat().st_mode & 0o777 == 0o755


def test_eval_without_out_keeps_each_sets_results(store, tmp_path):
    """Before: two sets in one folder both wrote <folder>/eval, the second overwriting the first."""
    sets = tmp_path / "sets"
    for name in ("a", "b"):
        distill(_config(store, tmp_path / f"run-{name}", seed=ord(name)))
        os.makedirs(sets, exist_ok=True)
        os.replace(tmp_path / f"run-{name}" / "images", sets / name)
    for name in ("a", "b"):
        result = _cli("eval", "--store", str(store), "--images", str(sets / name), "--backbone", BACKBONE,
                      "--epochs", "2", "--seeds", "1", "--quiet", "--device", "cpu")
        assert result.exit_code == 0, result.output
    for name in ("a", "b"):
        saved = json.loads((sets / f"eval-{name}" / "eval.json").read_text())
        assert list(saved["config"]["image_sets"]) == [name]


def test_progress_in_a_log_is_lines_not_redraws(store, tmp_path, monkeypatch):
    """Before: a log of `make demo > log` was mostly carriage-return frames of progress bars."""
    import featurestore.progress as progress_module

    monkeypatch.setattr(progress_module, "LINE_INTERVAL_S", 0.0)  # a line at every update
    result = _cli("distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(tmp_path / "run"),
                  "--steps", "7", "--augs", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("distill lgm: ")]
    assert [line.split(" step")[0] for line in lines[:7]] == [f"distill lgm: {k}/7" for k in range(1, 8)]
    assert "ETA" in lines[0] and ("step/s" in lines[0] or "s/step" in lines[0])
    assert "distill lgm: 7/7 step (100%)" in result.output


def test_checkpoint_holds_only_plain_data(store, tmp_path):
    """What `weights_only=True` accepts: the checkpoint a run writes loads that way."""
    out = tmp_path / "run"
    distill(_config(store, out))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 7 and isinstance(pickle.dumps(state["run"]), bytes)
    assert np.isfinite(state["metrics"][-1]["loss"])


def test_a_store_larger_than_the_memory_budget_is_sampled_not_loaded(store):
    """--real-batch auto never runs out of memory on a store larger than RAM: it samples and says so."""
    from engine.real import StoreRealSource

    split = FeatureStore.open(store).split(BACKBONE, "train")
    budget = 10 * split.dim * 4  # room for 10 of the 40 rows
    source = StoreRealSource.from_split(split, batch=None, augment_views=False, memory_budget=budget)
    assert source.num_rows == 10 and "fixed random sample of 10 rows" in source.note
    features, labels = source.sample(torch.Generator().manual_seed(0))
    stored = split.load(view=0)
    rows = {int(r): i for i, r in enumerate(stored.rows)}
    picked = split.load(view=0, rows=np.sort(np.random.default_rng(0).choice(np.arange(40), 10, replace=False)))
    assert torch.equal(features, picked.features) and torch.equal(labels, picked.labels)
    assert all(int(r) in rows for r in picked.rows)


def test_lr_auto_keeps_the_authors_total_movement():
    from engine.distill.config import resolve_lr

    assert resolve_lr("auto", 5000) == pytest.approx(2e-3)  # the authors' rate at their budget
    assert resolve_lr("auto", 400) == pytest.approx(0.025) and resolve_lr("auto", 10) == 0.05
    assert resolve_lr(0.1, 400) == 0.1
    assert resolve_lr("auto", 400, "centroid") == resolve_lr("auto", 10, "real") == pytest.approx(2e-3)  # from real pixels
    for bad in ("fast", 0, -1.0, float("inf")):
        with pytest.raises(DistillError, match="--lr must be a positive number or 'auto'"):
            resolve_lr(bad, 100)


def test_scheduled_lr_is_constant_or_a_cosine_decay_over_the_steps():
    from engine.distill.config import scheduled_lr

    assert [scheduled_lr(1.0, "cosine", t, 4) for t in range(4)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447],
                                                                                  abs=1e-6)
    assert scheduled_lr(0.3, "constant", 3, 4) == 0.3


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_scheduled_rate_is_the_one_adam_steps_with(store, tmp_path, schedule):
    """metrics.jsonl records each step's rate; the checkpoint's optimizer holds the last step's."""
    out = tmp_path / schedule
    options = {"lr_schedule": schedule}
    cosine_rates = [1e-3 * 0.5 * (1 + np.cos(np.pi * t / 7)) for t in range(7)]
    distill(_config(store, out, steps=7, lr=1e-3, **options))
    rates = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = cosine_rates if schedule == "cosine" else [1e-3] * 7
    assert rates == pytest.approx(expected, rel=1e-12)
    assert json.loads((out / "config.json").read_text())["optimizer"]["lr_schedule"] == schedule
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected[-1], rel=1e-12)
    if schedule == "cosine":
        # The schedule reaches the update: the constant run moved the images differently.
        constant = distill(_config(store, tmp_path / "c", steps=7, lr=1e-3))
        cosine = distill(_config(store, tmp_path / "again", steps=7, lr=1e-3, lr_schedule="cosine"))
        assert not torch.equal(constant.images, cosine.images)
        # Extended with --resume and a larger --steps, the remaining steps take the longer schedule's rates.
        distill(_config(store, out, steps=8, lr=1e-3, lr_schedule="cosine", resume=True))
        rates = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rates[:7] == pytest.approx(cosine_rates, rel=1e-12)
        assert rates[7] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 7 / 8)), rel=1e-12)


@pytest.mark.parametrize("patience", [1, 2, 3, 5])
def test_the_plateau_rule_is_pytorchs_reduce_on_plateau(patience):
    """PlateauRule.scale against torch.optim.lr_scheduler.ReduceLROnPlateau (mode min, relative threshold,
    no cooldown; its `patience` counts the bad checks it tolerates, ours the bad checks that reduce)."""
    from engine.distill.config import PlateauRule

    rule = PlateauRule(patience=patience, factor=0.5, rel_delta=1e-3)
    fits = (1.0 + 0.01 * torch.randn(40, generator=torch.Generator().manual_seed(patience))).tolist()
    fits[5:9] = [0.9, 0.8999, 0.95, 0.8990]  # a clear gain, a gain below the threshold, a loss, a gain at it
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=patience - 1,
                                                           threshold=1e-3, threshold_mode="rel", min_lr=0.0, eps=0.0)
    for i, fit in enumerate(fits):
        reference.step(fit)
        assert rule.scale(fits[:i + 1]) == opt.param_groups[0]["lr"], i
    assert opt.param_groups[0]["lr"] < 1.0  # the reference did reduce: the comparison covers reductions


def test_the_plateau_schedule_halves_the_rate_after_its_checks_and_resumes_the_same(store, tmp_path, monkeypatch):
    """--lr-schedule plateau: a fit entry every `every` steps (cross-entropy and top-1 of probes of the
    current images on the stored train features); the rate after each check is the base times the rule's
    scale of the fits so far; a run extended with --resume takes the same schedule and images as a straight run."""
    from engine.distill import config as config_module, run as run_module
    from engine.distill.config import PlateauRule

    # Every check after the first is "no gain" (a gain must halve the loss): the rate halves at every check.
    rule = PlateauRule(every=2, patience=1, factor=0.5, rel_delta=0.5)
    monkeypatch.setattr(config_module, "PLATEAU", rule)
    monkeypatch.setattr(run_module, "PLATEAU", rule)
    straight = distill(_config(store, tmp_path / "straight", steps=9, lr=1e-3, lr_schedule="plateau"))
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    fits = [m for m in lines if "fit_loss" in m]
    assert [m["step"] for m in fits] == [2, 4, 6, 8]
    assert all(0 < m["fit_loss"] < 20 and 0 <= m["fit_top1"] <= 100 and m["fit_seconds"] >= 0 for m in fits)
    assert [m["lr_scale"] for m in fits] == [1.0, 0.5, 0.25, 0.125]
    rates = [m["lr"] for m in lines if "loss" in m]
    assert rates == pytest.approx([1e-3] * 4 + [5e-4] * 2 + [2.5e-4] * 2 + [1.25e-4], rel=1e-12)
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["optimizer"]["lr_schedule"] == "plateau"
    # With real images through the backbone as the real side, the check reads its rows from the store.
    from_images = tmp_path / "from_images"
    distill(_config(store, from_images, steps=5, lr=1e-3, lr_schedule="plateau", real_source="images"))
    checks = [json.loads(line) for line in (from_images / "metrics.jsonl").read_text().splitlines()]
    checks = [m for m in checks if "fit_loss" in m]
    assert [m["step"] for m in checks] == [2, 4] and all(0 < m["fit_loss"] < 20 for m in checks)
    assert checks[0]["fit_loss"] == pytest.approx(fits[0]["fit_loss"], rel=1e-4)  # same images, same rows
    # The checks draw from their own generators: until the rate first changes, the run is the constant one.
    never = PlateauRule(every=2, patience=100)
    monkeypatch.setattr(config_module, "PLATEAU", never)
    monkeypatch.setattr(run_module, "PLATEAU", never)
    unchanged = distill(_config(store, tmp_path / "unchanged", steps=9, lr=1e-3, lr_schedule="plateau"))
    constant = distill(_config(store, tmp_path / "constant", steps=9, lr=1e-3, lr_schedule="constant"))
    assert torch.equal(unchanged.images, constant.images) and not torch.equal(unchanged.images, straight.images)
    monkeypatch.setattr(config_module, "PLATEAU", rule)
    monkeypatch.setattr(run_module, "PLATEAU", rule)
    # The default: a run without --lr-schedule is this one.
    default = distill(_config(store, tmp_path / "default", steps=9, lr=1e-3))
    assert default.config["optimizer"]["lr_schedule"] == "plateau" and torch.equal(default.images, straight.images)
    # The check runs once per due step: not again when a run stopped after it is resumed.
    distill(_config(store, tmp_path / "extended", steps=5, lr=1e-3, lr_schedule="plateau"))
    extended = distill(_config(store, tmp_path / "extended", steps=9, lr=1e-3, lr_schedule="plateau", resume=True))
    again = [json.loads(line) for line in (tmp_path / "extended" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in again if "fit_loss" in m] == [2, 4, 6, 8]
    assert torch.equal(extended.images, straight.images)


def test_bad_lr_schedule_is_one_line_and_writes_nothing(store, tmp_path):
    out = tmp_path / "bad"
    line = _one_line_error(_cli("distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out),
                                "--lr-schedule", "linear", "--quiet", "--device", "cpu"))
    assert "--lr-schedule must be constant or cosine or plateau, got 'linear'" in line and not out.exists()


def test_a_checkpoint_made_under_the_old_default_init_is_refused_naming_it(store, tmp_path):
    """The default --init changed (noise -> zero -> centroid): a run checkpointed with an old default, resumed
    with the same command line (so now --init centroid), must not continue as a run of another init."""
    out = tmp_path / "old"
    distill(_config(store, out, steps=7, init="zero"))
    result = _cli("distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out), "--ipc", "1",
                  "--steps", "9", "--augs", "1", "--grow-every", "1", "--checkpoint-every", "1", "--quiet",
                  "--device", "cpu", "--resume")
    line = _one_line_error(result)
    assert "--init 'zero' -> 'centroid'" in line
    assert distill(_config(store, out, steps=9, init="zero", resume=True)).resumed_from == 7


# ----------------------------------------------------------------------------------------------------
# writes that fail, races on --out, leftovers of a killed write


def test_a_full_disk_while_distilling_is_one_line_and_resume_continues(store, tmp_path, monkeypatch):
    """Before: an OSError while writing a checkpoint (disk full) was a traceback."""
    import engine.distill.loop as loop

    out = tmp_path / "full"
    real_save = loop.save_checkpoint
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "checkpoint.pt"))
        return real_save(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", full_disk)
        line = _one_line_error(_cli("distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out),
                                    "--steps", "7", "--augs", "1", "--grow-every", "1", "--checkpoint-every", "1",
                                    "--quiet", "--device", "cpu"))
    assert "No space left on device" in line and "free disk space" in line
    assert "--resume (the checkpoint of step 2 is intact)" in line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    resumed = distill(_config(store, out, resume=True))
    assert resumed.resumed_from == 2 and resumed.steps_done == 7
    assert torch.equal(resumed.images, distill(_config(store, tmp_path / "whole")).images)


def test_a_run_that_wrote_the_out_dir_while_this_one_loaded_is_not_overwritten(store, tmp_path, monkeypatch):
    """Before: --out was checked before the loads and locked after them; a run into the same --out that
    finished in between had its results overwritten."""
    import engine.distill.loop as loop

    out = tmp_path / "raced"
    real_lock = loop.exclusive_lock

    def other_run_finishes_first(directory, what):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "distilled.safetensors").write_bytes(b"the other run's result")
        return real_lock(directory, what)

    monkeypatch.setattr(loop, "exclusive_lock", other_run_finishes_first)
    with pytest.raises(DistillError, match="was written by another run while this one was loading "
                                           r"\(distilled.safetensors\)"):
        distill(_config(store, out))
    assert (out / "distilled.safetensors").read_bytes() == b"the other run's result"
    assert not (out / "config.json").exists()


def test_temp_files_of_a_killed_first_write_do_not_block_a_restart(store, tmp_path):
    """Before: a run killed while writing its first checkpoint left `.checkpoint.pt.*.tmp`: 'not empty' for
    the same command, 'no checkpoint' for --resume."""
    out = tmp_path / "killed-in-write"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert distill(_config(store, out)).steps_done == 7


def test_eval_refuses_an_unwritable_out_before_evaluating(store, tmp_path, monkeypatch):
    """Before: --out was checked only after the evaluation (minutes on a real store), then a traceback."""
    import engine.evaluate as evaluate_module

    run = tmp_path / "run"
    distill(_config(store, run))
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated before checking --out")

    monkeypatch.setattr(evaluate_module, "evaluate", must_not_run)
    line = _one_line_error(_cli("eval", "--store", str(store), "--images", str(run), "--backbone", BACKBONE,
                                "--out", str(blocker / "eval"), "--quiet", "--device", "cpu"))
    assert f"{blocker} is a file, not a directory" in line
    line = _one_line_error(_cli("eval", "--store", str(store), "--images", str(run), "--backbone", BACKBONE,
                                "--out", str(blocker), "--quiet", "--device", "cpu"))
    assert "exists and is not a directory" in line


def test_a_full_disk_while_writing_a_baseline_is_one_line_and_leaves_no_out(store, tmp_path, monkeypatch):
    """Before: an OSError while writing the baseline's images was a traceback."""
    import engine.imagefolder as imagefolder

    def full_disk(out_dir, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir))

    monkeypatch.setattr(imagefolder, "write_imagefolder", full_disk)
    out = tmp_path / "random"
    line = _one_line_error(_cli("baseline", "--store", str(store), "--backbone", BACKBONE, "--kind", "random",
                                "--out", str(out), "--quiet"))
    assert "cannot write the baseline" in line and "free disk space" in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_a_lost_sample_ids_chunk_is_named_when_ids_are_read(store, tmp_path):
    """Before: a missing sample_ids chunk read as empty ids, reported later as images gone from the source."""
    import shutil

    copy = tmp_path / "fs"
    shutil.copytree(store, copy)
    unit0 = copy / BACKBONE / "train" / "sample_ids" / "c" / "0"
    shutil.rmtree(unit0) if unit0.is_dir() else unit0.unlink()
    with pytest.raises(Exception) as info:
        FeatureStore.open(copy).split(BACKBONE, "train").sample_ids()
    assert type(info.value).__name__ == "StoreError"
    assert "sample_ids rows 0-" in str(info.value) and "empty sample ids" in str(info.value)
    assert "--repair" in str(info.value)


@pytest.mark.parametrize("backbones", ["test-cnn", [{"name": 5}], [{"name": ["test-cnn"]}], [], [["test-cnn"]]])
def test_a_malformed_backbones_record_is_one_line_before_evaluating(store, tmp_path, monkeypatch, backbones):
    """Issue 20, defect 6: a run's config.json with a malformed `backbones` field failed `engine eval` only
    after the whole evaluation (a TypeError when the table was written), or was silently ignored. Now one
    line naming the file, before any probe is trained, nothing written."""
    import engine.evaluate as evaluate_module
    from engine.imagefolder import write_imagefolder

    class_names = FeatureStore.open(store).class_names
    run = tmp_path / "run"
    write_imagefolder(run / "images", torch.rand(2, 3, 8, 8), [0, 1], class_names)
    (run / "config.json").write_text(json.dumps({"backbones": backbones}))

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated before checking the set's record")

    monkeypatch.setattr(evaluate_module, "_evaluate_set", must_not_run)
    line = _one_line_error(_cli("eval", "--store", str(store), "--images", str(run), "--backbone", BACKBONE,
                                "--quiet", "--device", "cpu"))
    assert f"{run / 'config.json'}: 'backbones' must be a non-empty list" in line
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "images"]  # no eval/ written
