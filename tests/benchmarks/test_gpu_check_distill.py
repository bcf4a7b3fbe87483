"""benchmarks/gpu_check_distill.py: gpu_check's distill-steps part times the step `engine distill` ships
(engine.distill.loop.step), run here on the CPU at a tiny size."""

from __future__ import annotations

import math

import pytest

from benchmarks.gpu_check_context import Context
from benchmarks.gpu_check_distill import distill_mode


@pytest.mark.parametrize("mode", ["store", "end-to-end"])
def test_distill_steps_run_the_shipped_step(tmp_path, monkeypatch, mode):
    import engine.distill.loop as loop
    from featurestore.backbones import create_backbone

    calls = []
    shipped = loop.step

    def counted(run, index, stop_requested):
        calls.append(index)
        return shipped(run, index, stop_requested)

    monkeypatch.setattr(loop, "step", counted)
    backbone = create_backbone("test-cnn", device="cpu")
    result = distill_mode(mode, backbone, c=3, ipc=1, augs=2, n_store=24, warmup=1, steps=2,
                          ctx=Context(True, tmp_path))
    assert calls == [0, 1, 2]
    assert result["steps_timed"] == 2 and result["losses_finite"] and math.isfinite(result["last_loss"])
