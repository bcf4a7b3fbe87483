"""`engine distill` under a real torchrun (2 gloo ranks on the CPU) when one rank is SIGKILLed in the
middle of a step (issue 20): the surviving rank prints one `error:` line naming the lost rank, the intact
checkpoint and `--resume`, exits 2, writes nothing more; `--resume` then finishes the run bit for bit as
an uninterrupted launch of the same world size. Before the fix the survivor printed gloo's traceback and
exited 1."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.torchrun_helpers import launches

BACKBONE = "test-cnn"


@pytest.fixture(scope="module")
def store(make_gratings_store) -> Path:
    return make_gratings_store(BACKBONE, splits=["train"], limit_per_class=4, dtype="fp32")


def _distill(store: Path, out: Path, *extra: str) -> list[str]:
    # --chunk 64 covers all 10 copies of a rank: one loss call per step, so the n-th call is step n.
    return ["distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out), "--ipc", "1", "--steps", "8",
            "--augs", "2", "--grow-every", "1", "--checkpoint-every", "2", "--chunk", "64", "--quiet", "--device", "cpu",
            *extra]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _kill_mid_step_then_resume(store: Path, tmp_path: Path, killed_rank: int) -> str:
    """Rank `killed_rank` of 2 SIGKILLed in the loss of step 6 (the other computes step 6 and waits for it in a
    collective); checks what must hold whichever rank died: the survivor's one `error:` line and exit 2,
    torchrun's summary, nothing written after the step-4 checkpoint, and `--resume` finishing the run bit for
    bit as an uninterrupted launch. Returns the survivor's line."""
    out, reference = tmp_path / "out", tmp_path / "reference"
    with launches() as start:
        # The uninterrupted run, alongside (resuming is bit for bit under the same world size).
        uninterrupted = start(tmp_path / "reference_logs", "cli.engine", _distill(store, reference))
        killed = start(tmp_path / "logs", "cli.engine", _distill(store, out), hooks=[
            {"rank": killed_rank, "target": "engine.objectives:LGMObjective.loss", "call": 6, "pause": True}])
        os.kill(killed.wait_for_marker(killed_rank), signal.SIGKILL)
        launcher_code, launcher_err = killed.finish()
        survivor = killed.rank(1 - killed_rank)
        lines = [line for line in survivor.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in survivor.stderr, survivor.stderr
        assert lines[0].startswith(f"error: rank {killed_rank} of 2 stopped or stopped answering ("), lines[0]
        assert survivor.exit_code == 2
        # torchrun adds its own summary (and exits 1): the root cause is the killed rank's SIGKILL.
        assert launcher_code == 1 and "Signal 9 (SIGKILL)" in launcher_err
        # Nothing written after the failure: the step-4 checkpoint, no outputs, no temp files.
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
        assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.pt", "config.json", "metrics.jsonl"]

        resumed = start(tmp_path / "resume_logs", "cli.engine", _distill(store, out, "--resume"))
        assert resumed.finish()[0] == 0, resumed.stderr(0)
        assert resumed.rank(0).exit_code == 0 and resumed.rank(1).exit_code == 0
        assert uninterrupted.finish()[0] == 0, uninterrupted.stderr(0)
    assert _losses(out) == _losses(reference) and len(_losses(out)) == 8
    got, want = load_file(out / "distilled.safetensors"), load_file(reference / "distilled.safetensors")
    assert torch.equal(got["images"], want["images"]) and torch.equal(got["labels"], want["labels"])
    return lines[0]


def test_a_rank_killed_mid_step_is_one_line_on_the_survivor_and_resume_is_bit_for_bit(store, tmp_path):
    line = _kill_mid_step_then_resume(store, tmp_path, killed_rank=1)
    out = tmp_path / "out"  # rank 0 wrote the checkpoints: it names the step
    assert f"the checkpoint of step 4 in --out {out} is intact: rerun the same command with --resume" in line


def test_rank_0_killed_mid_step_is_one_line_on_the_survivor_and_resume_is_bit_for_bit(store, tmp_path):
    """The writing rank is the one that dies: its lock on --out goes with it, the survivor (which never
    writes) names the last checkpoint rank 0 wrote, and the resume continues from it."""
    line = _kill_mid_step_then_resume(store, tmp_path, killed_rank=0)
    out = tmp_path / "out"
    assert f"the last checkpoint rank 0 wrote in --out {out} is intact: rerun the same command with --resume" in line
