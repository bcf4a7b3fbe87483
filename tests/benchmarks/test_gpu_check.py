"""benchmarks/gpu_check.py on a machine without CUDA: one line and exit 2; and its distill-steps part
times the step `engine distill` ships (engine.distill.loop.step), run here on the CPU at a tiny size."""

from __future__ import annotations

import math

import pytest

from benchmarks import gpu_check


def test_without_cuda_it_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_visible", lambda: False)
    assert gpu_check.main([]) == 2
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 1 and "no CUDA device" in out.out and not out.err


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
    result = gpu_check.distill_mode(mode, backbone, c=3, ipc=1, augs=2, n_store=24, warmup=1, steps=2,
                                    ctx=gpu_check.Context(True, tmp_path))
    assert calls == [0, 1, 2]
    assert result["steps_timed"] == 2 and result["losses_finite"] and math.isfinite(result["last_loss"])
