"""benchmarks/harness.py: child processes killed as a group at their timeout, one-line reasons, the peak
memory of a block, and a distillation that continues where it stopped."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import PeakExtraMemory, distill_unless_done, run_child, run_finished
from engine.distill.outdir import CHECKPOINT_FILE, DISTILLED_FILE


def test_a_child_hands_back_its_last_json_line_and_a_failure_its_last_line():
    done = run_child([sys.executable, "-c", "print('warming up'); print('{\"x\": 1}')"])
    assert done.ok and done.last_json() == {"x": 1}
    failed = run_child([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    assert not failed.ok and failed.reason() == "exit 3: boom"
    killed = run_child([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.reason() == "killed by SIGKILL (most likely out of memory)"


def test_a_child_past_its_timeout_is_killed_with_its_whole_group(tmp_path):
    marker = tmp_path / "grandchild-lived"
    start = time.perf_counter()
    done = run_child(["bash", "-c", f"(sleep 3; touch {marker}) & sleep 30"], timeout=1, log=tmp_path / "log.txt")
    assert done.timed_out and done.reason() == "timed out after 1 s (killed)"
    assert time.perf_counter() - start < 10
    time.sleep(3)
    assert not marker.exists()


def test_peak_extra_memory_sees_a_block_allocated_inside():
    with PeakExtraMemory(torch.device("cpu")) as memory:
        block = torch.ones(32 * 2**20 // 4)
    del block
    if memory.fresh:
        assert memory.extra_bytes >= 30 * 2**20


def test_distill_unless_done_starts_afresh_resumes_from_a_checkpoint_or_leaves_a_finished_run(tmp_path, monkeypatch):
    import engine.distill

    calls = []
    monkeypatch.setattr(engine.distill, "distill", lambda cfg: calls.append((cfg.resume, sorted(
        p.name for p in Path(cfg.out).iterdir()) if Path(cfg.out).exists() else None)))
    config = {"store": str(tmp_path / "store"), "steps": 4}
    fresh, resumed, finished = tmp_path / "fresh", tmp_path / "resumed", tmp_path / "finished"
    (fresh / "images").mkdir(parents=True)  # what a run killed before its first checkpoint left
    (resumed / CHECKPOINT_FILE).parent.mkdir()
    (resumed / CHECKPOINT_FILE).write_bytes(b"")
    finished.mkdir()
    (finished / DISTILLED_FILE).write_bytes(b"")
    assert distill_unless_done(fresh, config) and distill_unless_done(resumed, config)
    assert not distill_unless_done(finished, config) and run_finished(finished)
    assert calls == [(False, None), (True, [CHECKPOINT_FILE])]


def test_an_isolated_distillation_runs_in_a_child_and_its_failure_is_one_line(make_gratings_store, tmp_path):
    import pytest

    store = make_gratings_store()
    config = {"store": str(store), "backbone": "test-cnn", "steps": 2, "ipc": 1, "augs": 1, "quiet": True,
              "device": "cpu"}
    assert distill_unless_done(tmp_path / "run", config, isolated=True) and run_finished(tmp_path / "run")
    with pytest.raises(RuntimeError, match="^exit 1: .*"):
        distill_unless_done(tmp_path / "bad", {**config, "backbone": "no-such-backbone"}, isolated=True)
