"""engine/distill/memory.py: the memory readings a run records and the benchmarks measure with."""

from __future__ import annotations

import torch

from engine.distill.memory import current_memory_mb, peak_memory_mb, reset_peak_memory


def test_a_peak_after_a_reset_is_at_least_the_memory_in_use_and_sees_an_allocation():
    cpu = torch.device("cpu")
    fresh = reset_peak_memory(cpu)
    before = current_memory_mb(cpu)
    assert before > 0 and peak_memory_mb(cpu) >= before - 1  # the mark and the reading are a moment apart
    block = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
    if fresh:
        assert peak_memory_mb(cpu) - before >= 15
    del block


def test_the_up_front_check_counts_the_gradient_only_where_a_step_holds_one(monkeypatch):
    """One backbone in one process updates image by image (no gradient of the set): its estimate is 3
    float32 tensors of the parameters, not 4. Free memory between the two estimates lets that run start and
    refuses, in one line, the runs that hold the gradient (two backbones, two ranks, the pixel prior)."""
    import pytest

    import engine.distill.memory as memory
    from engine.distill.config import DistillConfig, DistillError

    c, res = 10, 128
    values = c * 2 * 3 * res * res
    assert memory.bytes_per_synthetic_value(False) == pytest.approx(24)  # 4/3 x 4 x 3 + 8
    assert memory.bytes_per_synthetic_value(True) == pytest.approx(88 / 3)  # 4/3 x 4 x 4 + 8
    have = values * 26  # between 24 and 29.3 bytes per value; the copies' share (0.1 MB) is below the margin
    monkeypatch.setattr(memory, "free_memory", lambda device: have)
    cpu = torch.device("cpu")
    cfg = DistillConfig(store="s", out="o", ipc=2, augs=2)
    memory.check_memory(cfg, c, res, cpu, [384])
    for refused in [lambda: memory.check_memory(cfg, c, res, cpu, [384, 768]),
                    lambda: memory.check_memory(cfg, c, res, cpu, [384], distributed=True),
                    lambda: memory.check_memory(DistillConfig(store="s", out="o", ipc=2, augs=2, pixel_prior=0.1),
                                                c, res, cpu, [384])]:
        with pytest.raises(DistillError, match="needs about .* lower --ipc"):
            refused()
