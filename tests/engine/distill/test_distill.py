"""engine.distill end to end on a tiny store (gratings dataset, test-cnn, fp32, 2 views): resume, Ctrl-C,
NaN, outputs, bad input, and the CLI (chunked back-propagation: test_backprop.py; the real side:
tests/engine/test_real.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import engine.objectives as objectives
from cli.engine import app
from engine.distill import DistillConfig, DistillError, DistillInterrupted, NonFiniteLossError, distill
from engine.imagefolder import read_imagefolder
from engine.objectives import LGMObjective
from featurestore.backbones import create_backbone
from featurestore.errors import StoreError
from featurestore.store import FeatureStore

BACKBONE = "test-cnn"
PER_CLASS = 6
CLASSES = 10


@pytest.fixture(scope="module")
def store(make_gratings_store) -> Path:
    return make_gratings_store(BACKBONE, splits=["train"], limit_per_class=PER_CLASS, dtype="fp32", views=2)


def _config(store: Path, out: Path, **kw) -> DistillConfig:
    # test-cnn's 36 px pyramid has 7 levels: with a level every step it is complete from step 7.
    base = dict(store=str(store), backbone=BACKBONE, out=str(out), ipc=1, steps=8, augs=2, grow_every=1,
                checkpoint_every=2, quiet=True, device="cpu")
    base.update(kw)
    return DistillConfig(**base)


def _fail_on_call(monkeypatch, call: int, exc_or_value):
    """Make LGMObjective.loss raise `exc_or_value` (an exception) or return it (a tensor) on call `call`."""
    original = LGMObjective.loss
    count = {"n": 0}

    def patched(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            if isinstance(exc_or_value, BaseException):
                raise exc_or_value
            return original(self, *args, **kwargs) * exc_or_value
        return original(self, *args, **kwargs)

    monkeypatch.setattr(objectives.LGMObjective, "loss", patched)


# ----------------------------------------------------------------------------------------------------
# Runs: outputs, resume, interrupts, NaN


def test_outputs_on_disk(store, tmp_path):
    out = tmp_path / "run"
    result = distill(_config(store, out, ipc=2, steps=7, init="zero"))  # a growing pyramid (checked below)
    names = FeatureStore.open(store).class_names
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == CLASSES * 2
    assert sorted(p.parent.name for p in pngs) == sorted(names * 2)
    images, labels, read_names = read_imagefolder(out / "images", class_names=names)
    assert images.shape == (20, 3, 36, 36) and read_names == names
    assert sorted(labels.tolist()) == sorted(result.labels.tolist())
    # PNGs hold the float images rounded to 8 bits.
    order = torch.argsort(labels * 10 + torch.arange(20) % 2)
    assert (images[order] - result.images).abs().max() <= 0.5 / 255 + 1e-6
    with safe_open(str(out / "distilled.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == {"images", "labels"}
        assert fh.get_tensor("images").dtype == torch.float32
        assert torch.equal(fh.get_tensor("images"), result.images)
        assert fh.get_tensor("labels").tolist() == [c for c in range(CLASSES) for _ in range(2)]
        assert json.loads(fh.metadata()["class_names"]) == names
    config = json.loads((out / "config.json").read_text())
    [backbone_record] = config["backbones"]
    assert backbone_record["store"]["fingerprint"] == FeatureStore.open(store).split(BACKBONE, "train").fingerprint
    assert backbone_record["fingerprint"] == create_backbone(BACKBONE).fingerprint
    assert config["method"] == "lgm" and config["arguments"]["ipc"] == 2 and config["steps_done"] == 7
    assert backbone_record["real"]["batch_resolved"] == "full" and config["tool_version"]  # --real-batch auto
    assert config["torch_version"] == torch.__version__ and config["seeds"]["seed"] == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6, 7] and all(m["peak_memory_mb"] > 0 for m in lines)
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The pyramid grew before the 7th step (its last level) and Adam was reset then: one update since
    # (without the reset, level 0 would show 7).
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 7 and len(ckpt["synthetic"]["levels"]) == 7
    assert [float(s["step"]) for s in ckpt["optimizer"]["state"].values()] == [1.0] * 7


def test_resume_after_ctrl_c_is_bit_for_bit(store, tmp_path, monkeypatch):
    straight = distill(_config(store, tmp_path / "a", steps=8, checkpoint_every=10))
    out = tmp_path / "b"
    with monkeypatch.context() as m:
        _fail_on_call(m, 4, KeyboardInterrupt())  # during step 4 (after the growth at index 3)
        with pytest.raises(DistillInterrupted) as info:
            distill(_config(store, out, steps=8, checkpoint_every=10))
    assert info.value.step == 3 and info.value.saved
    assert not (out / "distilled.safetensors").exists()
    resumed = distill(_config(store, out, steps=8, checkpoint_every=10, resume=True))
    assert resumed.resumed_from == 3
    assert resumed.losses == straight.losses
    assert torch.equal(resumed.images, straight.images)
    # A finished run extended with more steps continues the same trajectory.
    extended = distill(_config(store, tmp_path / "a", steps=9, checkpoint_every=10, resume=True))
    again = distill(_config(store, tmp_path / "c", steps=9, checkpoint_every=10))
    assert extended.losses == again.losses and torch.equal(extended.images, again.images)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fail_on_call(monkeypatch, 4, float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 4.*step 2"):
        distill(_config(store, out, steps=8, checkpoint_every=2))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(x).all() for x in ckpt["synthetic"]["levels"])
    assert not (out / "distilled.safetensors").exists()


def test_short_run_lowers_the_loss(store, tmp_path):
    # Exact real gradient, no augmentation: the remaining noise is the random head only.
    result = distill(_config(store, tmp_path / "run", param="pixels", steps=30, real_batch="full",
                             augment=False, lr=0.05))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak RSS reset)")
def test_peak_memory_is_the_runs_own(store, tmp_path):
    # A process that held 1.5 GB before the run (a notebook, a benchmark, the demo's earlier runs): the
    # run's recorded peak is its own, far below the process's high-water mark.
    held = torch.ones(1536 * 2**20, dtype=torch.uint8)
    held.add_(1)
    import resource

    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, with the 1.5 GB held
    del held
    distill(_config(store, tmp_path / "run", param="pixels", steps=2))
    peaks = [json.loads(x)["peak_memory_mb"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert process_peak - max(peaks) > 700, (process_peak, peaks)


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_refused_before_anything_is_written(store, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DistillError, match="exists and is not empty"):
        distill(_config(store, out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(DistillError, match="no checkpoint.pt"):
        distill(_config(store, tmp_path / "new", resume=True))
    for bad in ({"ipc": 0}, {"steps": -1}, {"real_batch": "half"}, {"chunk": 0}):
        with pytest.raises(DistillError):
            distill(_config(store, tmp_path / "new", **bad))
    with pytest.raises(StoreError, match="it holds: test-cnn/train"):
        distill(_config(store, tmp_path / "new", backbone="test-vit"))
    # Weights that differ from the ones the store was built with.
    state = {k: v + 0.01 for k, v in create_backbone(BACKBONE).model.state_dict().items()}
    weights = tmp_path / "other.pt"
    torch.save(state, weights)
    with pytest.raises(StoreError, match="pass the same --weights, or rebuild"):
        distill(_config(store, tmp_path / "new", weights=str(weights)))
    assert not (tmp_path / "new").exists()


def test_cli_runs_refuses_and_reports_interrupts(store, tmp_path, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out), "--steps", "7",
            "--augs", "1", "--quiet", "--device", "cpu", "--checkpoint-every", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and (out / "distilled.safetensors").is_file()
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "not empty" in refused.output
    _fail_on_call(monkeypatch, 2, KeyboardInterrupt())
    interrupted = runner.invoke(app, [*args[:6], str(tmp_path / "cli2"), *args[7:]])
    assert interrupted.exit_code == 130
    assert "interrupted at step 1; checkpoint saved; rerun with --resume" in interrupted.output


def test_ctrl_c_while_adam_updates_image_by_image_finishes_the_step(store, tmp_path, monkeypatch):
    """One backbone: the back-propagation runs inside the update (Adam image by image), where Ctrl-C is
    held: a Ctrl-C after the first images moved finishes the step, saves it, and a resume continues the
    same trajectory (a checkpoint with half the set updated would not)."""
    import os
    import signal

    from engine.distill.adam import RowUpdate

    straight = distill(_config(store, tmp_path / "a", steps=8, checkpoint_every=10, param="pixels"))
    original, calls = RowUpdate.rows, {"n": 0}

    def rows_then_ctrl_c(self, first, grads):
        original(self, first, grads)
        calls["n"] += 1
        if calls["n"] == 3 * CLASSES + 2:  # step 4, after its second image's rows (one image per pass)
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "b"
    with monkeypatch.context() as m:
        m.setattr(RowUpdate, "rows", rows_then_ctrl_c)
        with pytest.raises(DistillInterrupted) as info:
            distill(_config(store, out, steps=8, checkpoint_every=10, param="pixels", chunk=2))
    assert info.value.step == 4 and info.value.saved
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    resumed = distill(_config(store, out, steps=8, checkpoint_every=10, param="pixels", resume=True))
    assert resumed.resumed_from == 4
    torch.testing.assert_close(resumed.images, straight.images, atol=1e-6, rtol=0)
