"""Progress of long work on stderr: a live bar on a terminal (tqdm), and on anything else (a log file, a
CI console, `make demo > log`) a plain line every `interval` seconds and one at the end, never thousands of
carriage-return redraws."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

# Seconds between two plain progress lines when stderr is not a terminal.
LINE_INTERVAL_S = float(os.environ.get("PROBE_DISTILL_PROGRESS_INTERVAL", "30"))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class LineProgress:
    """tqdm's small interface (`update`, `set_postfix`, `close`, context manager) as plain lines."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, file: TextIO | None = None,
                 interval: float | None = None) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.file = file if file is not None else sys.stderr
        self.interval = LINE_INTERVAL_S if interval is None else interval  # read now, not at import
        self.start_n = initial
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:  # noqa: ARG002 - tqdm's signature
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def line(self) -> str:
        now = time.monotonic()
        elapsed = now - self.start
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _line(self, now: float) -> None:
        print(self.line(), file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.start_n:
                self._line(time.monotonic())

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", *, disable: bool = False, initial: int = 0,
             leave: bool = True, file: TextIO | None = None):
    """A progress bar for `total` units: tqdm on a terminal, `LineProgress` elsewhere, or a silent one."""
    file = file if file is not None else sys.stderr
    if disable:
        return tqdm(total=total, disable=True)
    if file.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=file,
                    dynamic_ncols=True, smoothing=0.1)
    return LineProgress(total, desc, unit, initial=initial, file=file)
