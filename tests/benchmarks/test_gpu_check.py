"""benchmarks/gpu_check.py on a machine without CUDA: one line and exit 2."""

from __future__ import annotations

from benchmarks import gpu_check


def test_without_cuda_it_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_visible", lambda: False)
    assert gpu_check.main([]) == 2
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == 1 and "no CUDA device" in out.out and not out.err
