"""Ctrl-C and SIGTERM during a run: a checkpoint is saved and the run stops with `DistillInterrupted`.

A single process turns Ctrl-C into KeyboardInterrupt (Python's default) and SIGTERM too
(`sigterm_as_ctrl_c`), held back only while the parameters are being updated, so a checkpoint never holds
half an update (`defer_sigint`). With one backbone the update includes the step's back-propagation
(Adam updates each image as its gradient completes: engine.distill.backprop), so a Ctrl-C there takes
effect at the end of the step. Ranks of a
distributed run must stop at the same step (a KeyboardInterrupt in the middle of a step would leave the
other ranks waiting in a collective): there Ctrl-C and SIGTERM only set a flag for the whole run
(`stop_flags`), and the ranks combine their flags at every step's gradient reduction.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class DistillInterrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint was saved (when possible); `step` steps are done."""

    def __init__(self, step: int, saved: bool, out: Path) -> None:
        super().__init__(step)
        self.step = step
        self.saved = saved
        self.out = out

    def message(self) -> str:
        if self.saved:
            return f"interrupted at step {self.step}; checkpoint saved; rerun with --resume to continue"
        return (f"interrupted at step {self.step} during an optimizer update; the last periodic checkpoint "
                f"in {self.out} is kept; rerun with --resume to continue from it")


@contextmanager
def _signal_flag(signals: tuple[signal.Signals, ...]) -> Iterator[list[bool]]:
    """While inside, the given signals only set received[0]; the previous handlers come back after.
    Only possible in the main thread (elsewhere the flag simply never gets set)."""
    received = [False]
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):  # noqa: ARG001
        received[0] = True

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield received
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)


@contextmanager
def defer_sigint() -> Iterator[list[bool]]:
    """Hold Ctrl-C (and SIGTERM) while the parameters are being updated; re-raise it right after."""
    with _signal_flag((signal.SIGINT, signal.SIGTERM)) as received:
        yield received
    if received[0]:
        raise KeyboardInterrupt


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[list[bool]]:
    """A single process: SIGTERM, which cluster schedulers send before they kill a job, is handled like
    Ctrl-C (a checkpoint is saved, then the run stops)."""
    if threading.current_thread() is not threading.main_thread():
        yield [False]
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield [False]
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_flags():
    """Distributed runs: Ctrl-C and SIGTERM set a flag, read at the next step's gradient reduction."""
    return _signal_flag((signal.SIGINT, signal.SIGTERM))
