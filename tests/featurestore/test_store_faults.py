"""What the store side does when things go wrong: damaged chunks (detected on read, by `fs verify`, fixed
by `fs build --repair`), concurrent builds (locks), special files among the images, symlink loops,
stores inside the dataset root, read-only / full / misplaced stores, bad weights, progress in logs.

Each test names the defect it covers; on the code before these fixes each one fails (a traceback, a
hang caught by a timeout, a silent wrong result, or a missing command), as its docstring says."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
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
from typer.testing import CliRunner

from cli.fs import app
from featurestore import schema
from featurestore.datasets import CorruptImageError, decode_image_file, open_dataset
from featurestore.errors import StoreError
from featurestore.store import FeatureStore
from tests.featurestore.test_build import assert_groups_identical

REPO = Path(__file__).resolve().parents[2]
TINY = ["--limit-per-class", "4", "--split", "train", "--chunk-rows", "16", "--batch-size", "8",
        "--workers", "0", "--quiet"]
BUILD = ["build", "gratings", "--backbone", "test-cnn", *TINY]  # 40 rows, units of 16, 16, 8 rows
SPLIT = Path("test-cnn") / "train"


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def chunk(store: Path, array: str, unit: int) -> Path:
    path = store / SPLIT / array / "c" / str(unit)
    return path / "0" if (path / "0").exists() else path


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("faults") / "clean"
    result = run(*BUILD, "--store", store)
    assert result.exit_code == 0, result.output
    return store


@pytest.fixture
def store_copy(clean_store, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(clean_store, copy, ignore=shutil.ignore_patterns(".locks"))
    return copy


# ----------------------------------------------------------------------------------------------------
# 1. damaged features: detected on read, listed by `fs verify`, fixed by `fs build --repair`


def test_new_stores_checksum_every_chunk(clean_store):
    """Defect 1: the per-row arrays had no checksum (features had no codec at all)."""
    for name in (schema.FEATURES, schema.LABELS, schema.SAMPLE_IDS, schema.UNIT_SUM, schema.CLASS_MEAN):
        meta = json.loads((clean_store / SPLIT / name / "zarr.json").read_text())
        assert {"name": "crc32c"} in meta["codecs"], name
    assert json.loads((clean_store / "zarr.json").read_text())["attributes"]["schema_version"] == 1


@pytest.mark.parametrize("damage,array,rows,fragment", [
    ("delete features", "features", "rows 16-31 (unit 1 of 3)", "non-finite values"),
    ("random features", "features", "rows 32-39 (unit 2 of 3)", "checksum mismatch"),
    ("truncate features", "features", "rows 0-15 (unit 0 of 3)", "checksum mismatch"),
    ("random labels", "labels", "rows 16-31 (unit 1 of 3)", "checksum mismatch"),
    ("delete labels", "labels", "rows 0-15 (unit 0 of 3)", "skipped list disagree"),
])
def test_load_refuses_damaged_chunks_in_one_line(store_copy, damage, array, rows, fragment):
    """Defect 1: before, a missing chunk loaded as NaN rows (or, for labels, as 'skipped' rows) and a
    random or truncated chunk loaded as garbage or raised a zarr traceback."""
    kind, name = damage.split()
    unit = {"rows 0-15": 0, "rows 16-31": 1, "rows 32-39": 2}[rows.split(" (")[0]]
    path = chunk(store_copy, name, unit)
    size = path.stat().st_size
    if kind == "delete":
        path.unlink()
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(size))
    else:
        path.write_bytes(path.read_bytes()[: size // 2])
    sp = FeatureStore.open(store_copy).split("test-cnn", "train")
    with pytest.raises(StoreError) as info:
        sp.load()
    message = str(info.value)
    assert "\n" not in message
    assert f"test-cnn/train {array} {rows}" in message and fragment in message
    assert (f"rebuild with: fs build gratings --backbone test-cnn --store {store_copy} --limit-per-class 4 "
            f"--split train --repair") in message


def test_class_statistics_reads_refuse_missing_chunks(store_copy):
    """Defect 1: a missing class_mean chunk read as NaN means silently."""
    chunk(store_copy, "class_mean", 0).unlink()
    sp = FeatureStore.open(store_copy).split("test-cnn", "train")
    assert sp.load().features.shape == (40, 24)  # the features themselves are intact
    with pytest.raises(StoreError, match="class_mean is damaged.*--repair"):
        sp.class_mean()


def test_verify_lists_damaged_units_and_repair_recomputes_only_them(clean_store, store_copy):
    """Defect 1: `fs verify` and `fs build --repair` did not exist (typer exit 2, 'No such command' /
    'No such option'). Damage: unit 0's features chunk deleted, unit 2's overwritten with random bytes of
    the same size, the class means' chunk deleted."""
    assert run("verify", "--store", store_copy).exit_code == 0
    chunk(store_copy, "features", 0).unlink()
    rand = chunk(store_copy, "features", 2)
    rand.write_bytes(np.random.default_rng(1).bytes(rand.stat().st_size))
    chunk(store_copy, "class_mean", 0).unlink()

    result = run("verify", "--store", store_copy)
    assert result.exit_code == 1, result.output
    damaged = [line for line in result.stdout.splitlines() if line.startswith("damaged: ")]
    assert damaged == [
        "damaged: test-cnn/train unit 0 (rows 0-15): features: non-finite values in rows that hold an image: "
        "a missing or overwritten chunk",
        "damaged: test-cnn/train unit 2 (rows 32-39): features: checksum mismatch: the chunk was changed or "
        "truncated on disk",
        "damaged: test-cnn/train: class statistics: class_mean: missing or invalid values (a missing chunk?)",
    ]
    repair_line = next(line for line in result.stdout.splitlines() if "repair with: " in line)
    command = repair_line.split("repair with: ", 1)[1].split()
    assert command[:2] == ["fs", "build"] and command[-1] == "--repair"

    # The printed command, run as printed (plus how to run it: batch size as built, no workers).
    repaired = run(*command[1:], "--batch-size", "8", "--workers", "0", "--quiet")
    assert repaired.exit_code == 0, repaired.output
    assert "test-cnn/train: repaired: 2 damaged unit(s) (0, 2) recomputed; class statistics merged again" \
        in repaired.stdout
    assert "test-cnn/train: complete, 40 rows (24 computed now)" in repaired.stdout  # units 0 and 2 only
    assert_groups_identical(clean_store, store_copy, "test-cnn", "train")  # bit for bit
    assert run("verify", "--store", store_copy).exit_code == 0
    again = run(*command[1:], "--batch-size", "8", "--workers", "0", "--quiet")
    assert "already complete (40 rows), no damage found, nothing to do" in again.stdout


def test_verify_reports_labels_inconsistent_with_skipped_lists_and_old_stores(tmp_path, monkeypatch):
    """Defect 1: stores built before checksums stay readable and checkable: out-of-range labels and -1
    labels the unit's skipped list does not name are damage (they loaded silently before)."""
    monkeypatch.setattr(schema, "checksum_codecs", lambda: [])  # what older releases wrote
    store = tmp_path / "old"
    assert run(*BUILD, "--store", store).exit_code == 0
    monkeypatch.undo()
    meta = json.loads((store / SPLIT / "features" / "zarr.json").read_text())
    assert all(codec["name"] != "crc32c" for codec in meta["codecs"])
    ok = run("verify", "--store", store)
    assert ok.exit_code == 0 and "no chunk checksums" in ok.stdout
    labels = zarr.open_array(str(store / SPLIT / "labels"), mode="r+")
    labels[3] = 99
    labels[20] = -1
    with pytest.raises(StoreError, match=r"labels rows 0-15 \(unit 0 of 3\) is damaged \(label 99 out of range"):
        FeatureStore.open(store).split("test-cnn", "train").load()
    result = run("verify", "--store", store)
    assert result.exit_code == 1
    assert "damaged: test-cnn/train unit 0 (rows 0-15): labels: label 99 out of range -1..9" in result.stdout
    assert ("damaged: test-cnn/train unit 1 (rows 16-31): labels: 1 row(s) where the -1 (skipped) labels and "
            "the unit's skipped list disagree") in result.stdout


def test_truncated_split_metadata_is_one_line_everywhere(store_copy, dir_digest):
    """Defect 5: a truncated zarr.json of the split group gave JSONDecodeError tracebacks in info,
    build and reads."""
    meta = store_copy / SPLIT / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])
    before = dir_digest(store_copy)
    for args in (["info", "--store", store_copy], [*BUILD, "--store", store_copy]):
        one_line_error(run(*args), "metadata of split group", "is unreadable", "delete")
    verify = run("verify", "--store", store_copy)
    assert verify.exit_code == 1 and "damaged: test-cnn/train: the metadata of split group" in verify.stdout
    with pytest.raises(StoreError, match="unreadable"):
        FeatureStore.open(store_copy).split("test-cnn", "train")
    assert dir_digest(store_copy) == before


def test_fp16_overflow_is_refused_not_stored_as_inf(tmp_path, monkeypatch):
    """Readers take non-finite features for damage, so the writer must never store any: features beyond
    the float16 range were stored as inf before."""
    from featurestore.backbones import Backbone

    embed = Backbone.embed
    monkeypatch.setattr(Backbone, "embed", lambda self, *a, **k: embed(self, *a, **k) * 1e6)
    one_line_error(run(*BUILD, "--store", tmp_path / "s"), "exceed the float16 range", "--dtype fp32")


# ----------------------------------------------------------------------------------------------------
# 3. locks


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from featurestore.runtime import exclusive_lock
    with exclusive_lock(sys.argv[1], "test"):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def hold_lock():
    """hold_lock(folder): another live process holds folder/.lock (flock) until the test ends."""
    procs = []

    def hold(folder: Path) -> int:
        proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc.pid

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_second_build_is_refused_while_one_holds_the_store(tmp_path, hold_lock, dir_digest):
    """Defect 3: two builds into one store both did all the work; now the second stops, names the holder
    and writes nothing. Shards of one job lock separately and still run together."""
    store = tmp_path / "s"
    first = run(*BUILD, "--store", store, "--shard", "0/2")
    assert first.exit_code == 0, first.output
    assert (store / ".locks" / "test-cnn.shard-0-of-2" / ".lock").is_file()
    pid = hold_lock(store / ".locks" / "test-cnn")  # a plain build of test-cnn is running
    before = dir_digest(store)
    one_line_error(run(*BUILD, "--store", store), "is in use by another process", f"pid {pid} on")
    assert dir_digest(store) == before
    hold_lock(store / ".locks" / "test-cnn.shard-0-of-2")
    one_line_error(run(*BUILD, "--store", store, "--shard", "0/2"), "in use by another process")
    other = run(*BUILD, "--store", store, "--shard", "1/2")  # another shard of the same job: not blocked
    assert other.exit_code == 0, other.output
    assert "test-cnn/train: complete, 40 rows (24 computed now)" in other.stdout


KILL_MAIN_RUNNER = textwrap.dedent("""
    import sys, time, zarr
    _set = zarr.Array.__setitem__
    def slow(self, *args):  # a window in which to kill the build mid-way
        time.sleep(0.05)
        return _set(self, *args)
    zarr.Array.__setitem__ = slow
    from featurestore.build import build
    build("gratings", "test-cnn", sys.argv[1], splits=["train"], limit_per_class=4, chunk_rows=8,
          batch_size=4, workers=1, quiet=True)
""")


def test_a_killed_build_leaves_its_store_unlocked(tmp_path):
    """Defect 3 (lock hygiene): DataLoader workers are forked while the build holds its lock and inherit
    its descriptor; after `kill -9` of the build alone, they kept the store locked (naming the dead pid)
    until they noticed, seconds later. Now workers close it when they start."""
    from featurestore.runtime import is_locked

    store = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", KILL_MAIN_RUNNER, str(store)], cwd=REPO, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)
    markers = store / SPLIT / "unit_done" / "c"
    try:
        deadline = time.monotonic() + 120
        while not (markers.is_dir() and any(markers.iterdir())):  # workers are running by now
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the build made no progress"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # the build only: its worker lives on for a while
        proc.wait()
        assert is_locked(store / ".locks" / "test-cnn") is None
        result = run(*BUILD, "--store", store, "--chunk-rows", "8")
        assert result.exit_code == 0, result.output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()


def test_folder_holding_only_a_lock_is_an_empty_store(tmp_path):
    """Defect 3: hidden entries (a first build killed before it wrote zarr.json leaves .locks/) made the
    folder 'not a feature store'."""
    store = tmp_path / "s"
    (store / ".locks" / "test-cnn").mkdir(parents=True)
    (store / ".locks" / "test-cnn" / ".lock").write_text("")
    one_line_error(run("info", "--store", store), "no feature store")
    result = run(*BUILD, "--store", store)
    assert result.exit_code == 0, result.output
    assert run("info", "--store", store).exit_code == 0


# ----------------------------------------------------------------------------------------------------
# 4. special files among the images; 2. symlink loops; 6. stores inside the dataset root


def _tiny_folder(root: Path, classes: tuple[str, ...] = ("a", "b", "c"), per_class: int = 2) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray((rng.random((16, 16, 3)) * 200 + c).astype(np.uint8)).save(folder / f"img{i}.png")
    return root


def test_fifo_and_dev_zero_are_skipped_not_read(tmp_path):
    """Defect 4: a FIFO named x.png hung the build forever; a link to /dev/zero read until memory ran out.
    Run in a subprocess with a timeout so a regression fails instead of hanging the suite."""
    root = _tiny_folder(tmp_path / "data")
    os.mkfifo(root / "train" / "a" / "pipe.png")
    (root / "train" / "b" / "zero.png").symlink_to("/dev/zero")
    store = tmp_path / "s"
    command = [sys.executable, "-m", "cli.fs", "build", "imagefolder", "--backbone", "test-cnn", "--data-root",
               str(root), "--store", str(store), "--workers", "0", "--quiet"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "test-cnn/train: complete, 8 rows (8 computed now), 2 skipped" in result.stdout
    skipped = {s["sample_id"]: s["reason"] for s in FeatureStore.open(store).split("test-cnn", "train").skipped}
    assert skipped == {"train/a/pipe.png": "not a regular file (fifo)",
                       "train/b/zero.png": "not a regular file (character device)"}


def test_files_above_the_size_cap_are_refused(tmp_path, monkeypatch):
    """Defect 4: there was no size cap (decode_image_file read any file whole)."""
    from featurestore.datasets import decode

    path = _tiny_folder(tmp_path / "data") / "train" / "a" / "img0.png"
    assert decode_image_file(path).size == (16, 16)
    monkeypatch.setattr(decode, "MAX_IMAGE_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(CorruptImageError, match="file too large"):
        decode_image_file(path)
    assert decode.MAX_IMAGE_FILE_BYTES < 2**40  # the real default is a sane finite cap


def test_symlink_loops_and_duplicate_links_list_each_image_once(tmp_path):
    """Defect 2: `train/c/again -> .` listed c's 2 images once per loop level (dozens of times), silently."""
    root = _tiny_folder(tmp_path / "data")
    (root / "train" / "c" / "again").symlink_to(".")
    (root / "train" / "a" / "also.png").symlink_to("img0.png")  # the same file under a second name
    (root / "train" / "b" / "more").symlink_to("../a")  # class a's folder inside class b
    ds = open_dataset("imagefolder", root=root, split="train")
    assert ds.sample_ids == ["train/a/img0.png", "train/a/img1.png", "train/b/img0.png", "train/b/img1.png",
                             "train/c/img0.png", "train/c/img1.png"]  # of two paths, the real one is kept
    assert ds.warnings == ["split train: left out 2 folder link(s) to folders already listed (e.g. "
                           "train/b/more) and 1 path(s) to image files already listed (e.g. train/a/also.png); "
                           "every image is read once"]
    result = run("build", "imagefolder", "--backbone", "test-cnn", "--data-root", root, "--store",
                 tmp_path / "s", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    assert "complete, 6 rows" in result.stdout
    assert result.stderr.splitlines() == [f"warning: {ds.warnings[0]}"]


@pytest.mark.parametrize("where", [".", "train"])
def test_store_inside_the_dataset_root_is_not_a_split_or_class(tmp_path, where):
    """Defect 6: a store built into ROOT/features (or ROOT/train/features) became a split (or a class) of
    the next build, which then refused the store ('different class names')."""
    root = _tiny_folder(tmp_path / "data")
    store = root / where / "features"
    args = ["build", "imagefolder", "--backbone", "test-cnn", "--data-root", root, "--store", store,
            "--workers", "0", "--quiet"]
    assert run(*args).exit_code == 0
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert "test-cnn/train: already complete (6 rows), nothing to do" in again.stdout
    warnings = again.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipped ")
    assert "Zarr stores" in warnings[0] and os.path.join(where, "features").lstrip("./") in warnings[0]
    assert open_dataset("imagefolder", root=root, split="train").class_names == ["a", "b", "c"]


# ----------------------------------------------------------------------------------------------------
# 5. stores that cannot be written, disk full, bad weights


def test_parent_of_store_is_a_file_fails_before_the_backbone_loads(tmp_path, monkeypatch):
    """Defect 5: a NotADirectoryError traceback, after loading the backbone."""
    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the store was checked")

    monkeypatch.setattr("featurestore.build.create_backbone", no_backbone)
    (tmp_path / "notes.txt").write_text("x")
    one_line_error(run(*BUILD, "--store", tmp_path / "notes.txt" / "store"), "notes.txt is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "x"


READ_ONLY_RUNNER = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    import featurestore.build
    from cli.fs import app

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the store was checked")

    real = featurestore.build.create_backbone
    out = {}
    for name, argv in json.loads(sys.argv[1]).items():
        # A complete store needs the backbone (fingerprint check) but no write access; the others must be
        # refused before it loads.
        featurestore.build.create_backbone = real if name in ("complete", "verify") else no_backbone
        result = CliRunner().invoke(app, argv)
        out[name] = [result.exit_code, result.stdout, result.stderr]
    print(json.dumps(out))
""")


def test_read_only_store_fails_in_one_line_before_heavy_work(tmp_path, dir_digest):
    """Defect 5: builds into a read-only folder died with a PermissionError traceback after loading the
    backbone and decoding images. Run as a user the permissions apply to: root drops CAP_DAC_OVERRIDE."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    ro = tmp_path / "ro"
    ro.mkdir()
    partial, complete = tmp_path / "partial", tmp_path / "complete"
    assert run(*BUILD, "--store", partial, "--shard", "0/2").exit_code == 0
    assert run(*BUILD, "--store", complete).exit_code == 0
    for folder in (ro, partial, complete):
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    digests = {p: dir_digest(p) for p in (partial, complete)}
    argv = {"new": [*BUILD, "--store", str(ro / "store")], "partial": [*BUILD, "--store", str(partial)],
            "complete": [*BUILD, "--store", str(complete)], "verify": ["verify", "--store", str(complete)]}
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", READ_ONLY_RUNNER, json.dumps(argv)], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        for folder in (ro, partial, complete):
            for path in [folder, *folder.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    for name in ("new", "partial"):
        code, _, stderr = out[name]
        assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("error: "), (name, stderr)
        assert "permission denied" in stderr and "Traceback" not in stderr
    assert not (ro / "store").exists()
    assert out["complete"][0] == 0 and "already complete" in out["complete"][1]
    assert out["verify"][0] == 0 and "intact" in out["verify"][1]
    assert {p: dir_digest(p) for p in (partial, complete)} == digests


def _fill_disk_at(monkeypatch, where: str, nth: int = 1, finalizing: bool = False) -> None:
    """zarr's local writes raise OSError(ENOSPC) from the nth write of a path containing `where` on; with
    `finalizing`, only the writes of a split's finalize step count (`finalize_split`: the merged class
    statistics, then the split's attributes, `complete` last)."""
    import zarr.storage._local as local

    import featurestore.build as build_module

    real_put = local._put
    seen = {"n": 0}
    counting = [not finalizing]
    if finalizing:
        real_finalize = build_module.finalize_split

        def finalize(*args, **kwargs):
            counting[0] = True
            try:
                return real_finalize(*args, **kwargs)
            finally:
                counting[0] = False

        monkeypatch.setattr(build_module, "finalize_split", finalize)

    def full_disk(path, value, exclusive=False):
        if counting[0] and where in Path(path).as_posix():
            seen["n"] += 1
            if seen["n"] >= nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", full_disk)


def test_disk_full_is_one_line_and_the_build_resumes(tmp_path, clean_store, monkeypatch):
    """Defect 5: an OSError(ENOSPC) from a chunk write was a traceback. Now one line; the finished units
    stay, `fs verify` sees an incomplete (not damaged) split, and a rerun finishes it bit for bit."""
    _fill_disk_at(monkeypatch, "features/c/1")
    store = tmp_path / "s"
    one_line_error(run(*BUILD, "--store", store), "cannot write to store", "No space left on device",
                   "free disk space, then rerun the same command")
    monkeypatch.undo()
    verify = run("verify", "--store", store)
    assert verify.exit_code == 1 and "incomplete (1/3 units" in verify.stdout and "damaged:" not in verify.stdout
    resumed = run(*BUILD, "--store", store)
    assert "complete, 40 rows (24 computed now)" in resumed.stdout, resumed.output
    assert_groups_identical(clean_store, store, "test-cnn", "train")


# Where a full disk can strike a build: a later chunk, a unit's completion marker, and while the split and
# its arrays are created (class_mean's metadata, the 2nd write of the split's zarr.json, unit_sum's metadata).
DISK_FULL_POINTS = [("features/c/1/", 1), ("unit_done/c/2", 1), ("class_mean/", 1), ("test-cnn/train/zarr.json", 2),
                    ("unit_sum/zarr.json", 1)]
# ... and in its finalize step, once every unit is done: each merged class statistic, then the split's
# attributes, written one by one (the 1st: `greyscale`; the 6th and last: `complete`).
FINALIZE_POINTS = [("class_count/c/", 1), ("class_mean/c/", 1), ("class_sq_mean/c/", 1),
                   ("test-cnn/train/zarr.json", 1), ("test-cnn/train/zarr.json", 6)]


@pytest.mark.parametrize("where,nth", DISK_FULL_POINTS)
def test_disk_full_at_any_write_is_one_line_and_the_build_resumes(tmp_path, clean_store, monkeypatch, where, nth):
    """Issue 20, defect 4: a full disk at each moment of a build (chunks, markers, finalize, metadata) is
    one line, and what it leaves is read right: `fs verify` calls the split incomplete (never damaged or
    intact), and a rerun finishes it bit for bit."""
    _fill_disk_at(monkeypatch, where, nth)
    store = tmp_path / "s"
    one_line_error(run(*BUILD, "--store", store), "cannot write to store", "No space left on device",
                   "free disk space, then rerun the same command")
    monkeypatch.undo()
    verify = run("verify", "--store", store)
    assert verify.exit_code == 1 and "damaged:" not in verify.stdout, verify.output
    resumed = run(*BUILD, "--store", store)
    assert resumed.exit_code == 0 and "test-cnn/train: complete, 40 rows" in resumed.stdout, resumed.output
    assert run("verify", "--store", store).exit_code == 0
    assert_groups_identical(clean_store, store, "test-cnn", "train")


@pytest.mark.parametrize("where,nth", FINALIZE_POINTS)
def test_disk_full_while_finalizing_is_one_line_and_the_rerun_only_finalizes(tmp_path, clean_store, monkeypatch,
                                                                            where, nth):
    """Issue 20: a full disk in the build's last step (the class statistics merged from the units, the
    split's attributes) was untested. One line, exit 2; every unit stays done and the split incomplete
    (`fs verify`: 3/3 units, not damaged, exit 1; `engine` refuses it), and the same command once there
    is space again computes nothing, finalizes, and the store is bit for bit a clean build's."""
    _fill_disk_at(monkeypatch, where, nth, finalizing=True)
    store = tmp_path / "s"
    one_line_error(run(*BUILD, "--store", store), "cannot write to store", "No space left on device",
                   "free disk space, then rerun the same command")
    monkeypatch.undo()
    group = zarr.open_group(str(store), mode="r")["test-cnn"]["train"]
    assert group.attrs["complete"] is False and group["unit_done"][:].tolist() == [1, 1, 1]
    verify = run("verify", "--store", store)
    assert verify.exit_code == 1 and "incomplete (3/3 units" in verify.stdout and "damaged:" not in verify.stdout
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(store).split("test-cnn", "train")
    resumed = run(*BUILD, "--store", store)
    assert resumed.exit_code == 0 and resumed.stdout.splitlines() == ["test-cnn/train: complete, 40 rows (0 computed now)"]
    assert run("verify", "--store", store).exit_code == 0
    assert_groups_identical(clean_store, store, "test-cnn", "train")


@pytest.mark.parametrize("where,nth", [("features/c/1/", 1), ("test-cnn/train/zarr.json", 2)])
def test_disk_full_on_a_loaded_machine_prints_no_traceback_at_exit(tmp_path, where, nth):
    """Issue 20, defect 4: after the `error:` line of a full disk, 2 of 7 attack runs printed a traceback:
    zarr's exit handler waits 0.2 s for its IO thread and then closes the loop anyway ("Cannot close a
    running event loop"), which fails whenever that thread is not scheduled in time (a loaded machine).
    Here the thread is kept busy for a second at exit; the CLI has already stopped it, so stderr is the
    one line."""
    script = textwrap.dedent(f"""
        import atexit, errno, os, sys, time
        from pathlib import Path
        import zarr.storage._local as local
        from zarr.core import sync
        from cli.fs import main

        real_put = local._put
        seen = [0]
        def full_disk(path, value, exclusive=False):
            if {where!r} in Path(path).as_posix():
                seen[0] += 1
                if seen[0] >= {nth}:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_put(path, value, exclusive)
        local._put = full_disk

        def starve_io_thread():  # registered after zarr's handler, so it runs first
            if sync.loop[0] is not None:
                sync.loop[0].call_soon_threadsafe(time.sleep, 1.0)
                time.sleep(0.1)
        atexit.register(starve_io_thread)
        sys.argv = ["fs", *{[str(a) for a in BUILD]!r}, "--store", {str(tmp_path / "s")!r}]
        main()
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to store"), result.stderr


def test_missing_or_bad_weights_of_test_backbones_are_one_line(tmp_path):
    """Defect 5: `_load_random` called torch.load / load_state_dict unguarded: FileNotFoundError,
    UnpicklingError and RuntimeError tracebacks."""
    from featurestore.backbones import create_backbone

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "vit.pt"
    torch.save(create_backbone("test-vit").model.state_dict(), other)
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    store = tmp_path / "s"
    cases = [(tmp_path / "missing.pt", "no such file"), (garbage, "could not read --weights"),
             (other, "does not match backbone 'test-cnn'"), (listed, "not a state dict")]
    for weights, fragment in cases:
        one_line_error(run(*BUILD, "--store", store, "--weights", weights), fragment)
    assert not store.exists()


# ----------------------------------------------------------------------------------------------------
# 7. progress in logs


def test_build_progress_in_a_log_has_no_carriage_returns(tmp_path):
    """Defect 7: tqdm wrote carriage-return frames into logs; now plain lines."""
    log = tmp_path / "build.log"
    command = [sys.executable, "-m", "cli.fs", *[a for a in BUILD if a != "--quiet"], "--store", str(tmp_path / "s")]
    with open(log, "w") as stderr:
        result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, timeout=240,
                                env={**os.environ, "PROBE_DISTILL_PROGRESS_INTERVAL": "0"})
    assert result.returncode == 0
    text = log.read_bytes()
    assert b"\r" not in text
    assert b"test-cnn/train: 40/40 img (100%)" in text


# ----------------------------------------------------------------------------------------------------
# Issue 20: statistics that cannot be silently wrong


def _present_class(store: Path, unit: int) -> int:
    counts = zarr.open_array(str(store / SPLIT / schema.UNIT_COUNT), mode="r")[unit]
    return int(np.flatnonzero(counts)[0])


def _damaged_lines(store: Path) -> list[str]:
    result = run("verify", "--store", store)
    assert result.exit_code == 1, result.output
    return [line for line in result.stdout.splitlines() if line.startswith("damaged: ")]


@pytest.mark.parametrize("array", [schema.UNIT_SUM, schema.UNIT_SQSUM, schema.UNIT_COLOUR])
def test_a_deleted_statistics_partial_is_damage_and_repair_merges_right(clean_store, store_copy, array):
    """Issue 20, defect 1: unit_sum / unit_sqsum / unit_colour had fill value 0, so a deleted chunk read as
    a plausible 0: `fs verify` said intact, and a --repair of another unit merged class statistics
    without that unit's sums (class_mean off by up to 0.035 on 0.10) which verify still called intact.
    Now a unit's partial sums are recomputed from its features, unit_colour's fill means 'missing', and
    the repair recomputes the unit whose partial was lost: the store is the clean one bit for bit."""
    if array == schema.UNIT_COLOUR:
        path = store_copy / SPLIT / array / "c" / "1"
    else:
        path = store_copy / SPLIT / array / "c" / "1" / str(_present_class(store_copy, 1)) / "0"
    path.unlink()
    chunk(store_copy, "features", 0).unlink()  # and another unit's damage, repaired with it
    damaged = _damaged_lines(store_copy)
    assert damaged[0].startswith("damaged: test-cnn/train unit 0 (rows 0-15): features:")
    assert damaged[1].startswith(f"damaged: test-cnn/train unit 1 (rows 16-31): {array}:"), damaged
    command = next(line for line in run("verify", "--store", store_copy).stdout.splitlines()
                   if "repair with: " in line).split("repair with: ", 1)[1].split()
    repaired = run(*command[1:], "--batch-size", "8", "--workers", "0", "--quiet")
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: 2 damaged unit(s) (0, 1) recomputed" in repaired.stdout
    assert_groups_identical(clean_store, store_copy, "test-cnn", "train")
    assert run("verify", "--store", store_copy).exit_code == 0


def test_verify_recomputes_class_statistics_from_the_unit_sums(store_copy):
    """Issue 20, defect 1: class_mean rewritten with valid checksums (0.035 added to one value) was
    'intact' for verify, which only checked that the statistics were finite."""
    means = zarr.open_array(str(store_copy / SPLIT / schema.CLASS_MEAN), mode="r+")
    values = means[:]
    values[3, 5] += 0.035
    means[:] = values
    damaged = _damaged_lines(store_copy)
    assert damaged == ["damaged: test-cnn/train: class statistics: class_mean: disagrees with the units' "
                       "partial sums (class 3, max abs diff 0.035)"]


def test_verify_checks_features_against_the_unit_sums(clean_store, store_copy, tmp_path):
    """Issue 20, defect 11: every feature set to 60000 with the checksums recomputed (written through
    zarr) passed verify, distill and eval. The per-unit sums, computed at build from the backbone's
    output, now have to match the stored features (within the storage dtype's rounding)."""
    features = zarr.open_array(str(store_copy / SPLIT / schema.FEATURES), mode="r+")
    features[:] = np.full(features.shape, 60000, dtype=features.dtype)
    damaged = _damaged_lines(store_copy)
    assert len(damaged) == 3 and all(": features: disagree with the unit's partial sums (unit_sum" in line
                                     for line in damaged), damaged
    # One value of one row changed by 0.05: far less than the values' spread, far more than fp16 rounding.
    nudged = tmp_path / "nudged"
    shutil.copytree(clean_store, nudged, ignore=shutil.ignore_patterns(".locks"))
    features = zarr.open_array(str(nudged / SPLIT / schema.FEATURES), mode="r+")
    features[33, 7] = features[33, 7] + np.float16(0.05)
    assert _damaged_lines(nudged) == [
        "damaged: test-cnn/train unit 2 (rows 32-39): features: disagree with the unit's partial sums "
        "(unit_sum, class 8, max abs diff 0.05): features or unit_sum changed since the build"]


def test_resuming_a_build_after_the_images_changed_is_refused(tmp_path, monkeypatch, dir_digest):
    """Issue 20, defect 2: a half-built split resumed after its files were re-pixelled (same names, same
    labels) mixed old and new features, and verify called the result intact. The split records a
    digest of its source files (size and modification time of each); a build that would write into the
    split with other files is one line and changes nothing."""
    import zarr.storage._local as local
    from PIL import Image

    root = _tiny_folder(tmp_path / "data", per_class=3)
    store = tmp_path / "s"
    args = ["build", "imagefolder", "--data-root", root, "--backbone", "test-cnn", "--split", "train",
            "--chunk-rows", "3", "--batch-size", "3", "--workers", "0", "--quiet", "--store", store]
    real_put = local._put

    def full_disk(path, value, exclusive=False):
        if "features/c/2" in Path(path).as_posix():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", full_disk)
    one_line_error(run(*args), "No space left on device")
    monkeypatch.undo()
    image = root / "train" / "c" / "img0.png"
    stat, original = image.stat(), image.read_bytes()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    before = dir_digest(store)
    one_line_error(run(*args), "source images of", "changed since the split was started", "delete")
    assert dir_digest(store) == before
    # The files as they were: the build resumes.
    image.write_bytes(original)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resumed = run(*args)
    assert resumed.exit_code == 0 and "complete, 9 rows (3 computed now)" in resumed.stdout, resumed.output


def test_an_image_above_the_decode_pixel_bound_is_skipped_from_its_header(tmp_path):
    """Issue 20, defect 3: a PNG of a few KB declaring 9500x9500 pixels (90 MP, just above PIL's bomb
    threshold, where PIL only warns) was decoded whole in each worker. Now refused from its header."""
    from PIL import Image

    path = tmp_path / "bomb.png"
    Image.new("1", (9500, 9500)).save(path)
    assert path.stat().st_size < 100_000
    with pytest.raises(CorruptImageError, match=r"9500x9500 pixels, more than the 89478485 decoded per image"):
        decode_image_file(path)


HUGE = "99999999999999999999"


@pytest.mark.parametrize("option,value,fragment", [
    ("--views", HUGE, "--views must be at most 1024"),
    ("--workers", HUGE, "--workers must be at most"),
    ("--chunk-rows", HUGE, "--chunk-rows must be at most 1048576"),
    ("--batch-size", HUGE, "--batch-size must be at most 65536"),
    ("--limit-per-class", HUGE, "--limit-per-class must be at most 2147483647"),
    ("--limit-per-class", "0", "--limit-per-class must be >= 1"),
    ("--image-size", HUGE, "--image-size must be at most 4096"),
    ("--seed", HUGE, "--seed must be at most 9223372036854775807"),
    ("--seed", "-1", "--seed must be >= 0"),
])
def test_every_numeric_build_option_is_bounded(tmp_path, option, value, fragment):
    """Issue 20, defect 9: no upper bounds: --views 99999999999999999999 hung and left the split with those
    attributes, --workers forked until killed, --chunk-rows ended in an OverflowError traceback. Now one
    line before anything is written."""
    store = tmp_path / "s"
    args = ["build", "gratings", "--backbone", "test-cnn", "--store", store, "--split", "train", "--quiet"]
    if option != "--limit-per-class":
        args += ["--limit-per-class", "1"]
    one_line_error(run(*args, option, value), fragment)
    assert not store.exists()


@pytest.mark.parametrize("shape", [[40, 23], [39, 24], [40, 2, 24]])
def test_features_metadata_with_another_shape_is_one_line(store_copy, shape):
    """Issue 20, defect 6: a features zarr.json declaring another shape made distill fail with an
    IndexError traceback. Reads compare every array's shape with the split's attributes."""
    meta_path = store_copy / SPLIT / "features" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = shape
    if len(shape) != len(meta["chunk_grid"]["configuration"]["chunk_shape"]):
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [16, *shape[1:]]
        meta["dimension_names"] = None
    meta_path.write_text(json.dumps(meta))
    sp = FeatureStore.open(store_copy).split("test-cnn", "train")
    with pytest.raises(StoreError, match=r"features has shape .* the split's attributes say \(40, 24\)"):
        sp.load()


@pytest.mark.parametrize("class_names,fragment", [
    (["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"], "11 class names but its arrays hold 10 classes"),
    ("abcdefghij", "class_names is not a list of strings"),
    (["a", "b", "c", "d", "e", "f", "g", "h", "i", "i"], "class_names repeats"),
])
def test_class_names_that_disagree_with_the_arrays_are_damage(store_copy, class_names, fragment):
    """Issue 20, defect 7: distill ran on a store whose class_names disagreed with its arrays (one name
    too many: a class with no data; a plain string "abc": classes a, b, c) while verify said damaged or
    even intact. Opening a split refuses it in one line; verify reports it (exit 1)."""
    meta_path = store_copy / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["class_names"] = class_names
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=fragment):
        FeatureStore.open(store_copy).split("test-cnn", "train")
    result = run("verify", "--store", store_copy)
    assert result.exit_code == 1 and fragment in result.stdout, result.output


def test_the_advice_for_a_missing_split_repeats_the_data_root(tmp_path):
    """Issue 20, defect 10: the missing-val advice lacked --data-root, so the command it printed failed."""
    root = _tiny_folder(tmp_path / "data")
    store = tmp_path / "s"
    assert run("build", "imagefolder", "--data-root", root, "--backbone", "test-cnn", "--split", "train",
               "--workers", "0", "--quiet", "--store", store).exit_code == 0
    with pytest.raises(StoreError) as info:
        FeatureStore.open(store).split("test-cnn", "val")
    assert (f"`fs build imagefolder --backbone test-cnn --split val --store {store} --data-root {root}`"
            in str(info.value)), str(info.value)


@pytest.mark.parametrize("name", [schema.CLASS_MEAN, schema.CLASS_COUNT])
def test_an_array_of_another_d_advises_what_repair_can_do(store_copy, name):
    """Issue 20, defect 10: a statistics array whose metadata declares another feature dimension D (or
    class count) failed its read advising `fs build ... --repair`, and --repair then refused ("cannot be
    repaired unit by unit"). Reads now compare every array's shape with the split's attributes and give
    the advice verify gives: delete the split and rebuild it; following that advice works."""
    meta_path = store_copy / SPLIT / name / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [*meta["shape"][:-1], meta["shape"][-1] + 8]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [*meta["chunk_grid"]["configuration"]["chunk_shape"][:-1],
                                                          meta["shape"][-1]]
    meta_path.write_text(json.dumps(meta))
    sp = FeatureStore.open(store_copy).split("test-cnn", "train")
    with pytest.raises(StoreError) as info:
        getattr(sp, name)()
    assert "--repair" not in str(info.value) and f"{name} has shape" in str(info.value), info.value
    assert "rebuild the split" in str(info.value)
    verify = run("verify", "--store", store_copy)
    assert verify.exit_code == 1 and "repair with" not in verify.stdout, verify.output
    repair = run(*BUILD, "--store", store_copy, "--repair")
    one_line_error(repair, "cannot be repaired unit by unit", "rebuild the split")
    shutil.rmtree(store_copy / SPLIT)  # the advice, followed
    assert run(*BUILD, "--store", store_copy).exit_code == 0
    assert run("verify", "--store", store_copy).exit_code == 0
