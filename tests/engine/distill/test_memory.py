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
