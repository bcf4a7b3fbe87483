"""What every part of benchmarks/gpu_check.py shares: the `Context` it runs in (device, work folder, dry run)
and its one-line reasons."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import ChildRun


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Context:
    def __init__(self, dry: bool, work: Path) -> None:
        self.dry = dry
        self.work = work
        self.device = "cpu" if dry else "cuda"

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


def tail_reason(done: ChildRun) -> str:
    return one_line(done.reason())
