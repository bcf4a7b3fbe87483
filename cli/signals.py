"""Ctrl-C and SIGTERM at any moment of an `fs` / `engine` process: one line and exit 130, never a traceback
(issue 20). Standard library only: it is in force before typer, torch or zarr are imported.

A process goes through three phases:
- starting (`on_start`, the first call of cli/fs.py's and cli/engine.py's `main`): the modules load and
  the options are parsed, nothing is written yet; a signal prints one line and ends the process at once
  (a KeyboardInterrupt raised inside `import torch` can surface as any exception, or as none).
- running (`command_signals`, entered by `cli.common.user_errors` around the command): Ctrl-C and SIGTERM
  both raise KeyboardInterrupt; the command turns it into its line and exit 130 (a distillation saves a
  checkpoint first; its step loop holds them while the parameters are updated,
  engine/distill/signals.py).
- finished (`outputs_complete`, called once a command's outputs are all written, and on leaving the
  command whatever its outcome): the exit status is decided, so a late signal is ignored; a run whose
  outputs are complete exits 0.
Only a process started through one of those `main`s changes its handlers: a command called in-process
(tests, `CliRunner`) keeps its caller's.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

INTERRUPTED = 130  # the exit code of Ctrl-C and SIGTERM (128 + SIGINT, the shell's convention)
STARTING_LINE = "error: interrupted while starting; nothing was written"
# torchrun sets TORCHELASTIC_RUN_ID in every process it starts, and SIGTERMs them all when one fails: a rank
# it stops outside a collective never sees the failure itself, so its line says where to look.
TORCHRUN_STOPPED_LINE = ("interrupted: torchrun stopped this rank (SIGTERM); it does so when another rank fails "
                         "(its summary names that rank) or when torchrun itself is stopped")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_owned = [False]  # this process was started by `on_start`: its handlers are ours to change
_received: list[int | None] = [None]  # the last signal turned into a KeyboardInterrupt


def _exit_while_starting(signum, frame) -> None:  # noqa: ARG001
    try:
        os.write(2, (STARTING_LINE + "\n").encode())
    finally:
        os._exit(INTERRUPTED)  # nothing written, nothing to clean up; no exception can escape half an import


def _raise_interrupt(signum, frame) -> None:  # noqa: ARG001
    _received[0] = signum
    raise KeyboardInterrupt


def interrupted_line() -> str:
    """The line of a command stopped by a signal: `interrupted`, or which rank torchrun's SIGTERM leaves
    to its summary."""
    if _received[0] == signal.SIGTERM and "TORCHELASTIC_RUN_ID" in os.environ:
        return TORCHRUN_STOPPED_LINE
    return "interrupted"


def on_start() -> None:
    """The first thing an `fs` / `engine` process does: a signal while it starts is one line, exit 130."""
    if threading.current_thread() is not threading.main_thread():
        return
    _owned[0] = True
    for sig in _SIGNALS:
        signal.signal(sig, _exit_while_starting)


def outputs_complete() -> None:
    """The command's outputs are all written (or its outcome is decided): later signals are ignored."""
    if _owned[0]:
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


@contextmanager
def command_signals() -> Iterator[None]:
    """While a command runs: Ctrl-C and SIGTERM raise KeyboardInterrupt; ignored once it has ended."""
    if not _owned[0]:
        yield
        return
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        outputs_complete()
