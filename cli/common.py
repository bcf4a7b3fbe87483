"""What every CLI command shares: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable, TypeVar

import typer

from cli.signals import INTERRUPTED, command_signals, interrupted_line
from featurestore.errors import UserError
from featurestore.runtime import stop_zarr_io_thread

F = TypeVar("F", bound=Callable)


def _ours(category: type) -> bool:
    return category.__module__.split(".")[0] in ("featurestore", "engine", "cli")


def _error_in_flight(interrupt: KeyboardInterrupt) -> UserError | None:
    """The UserError being raised when Ctrl-C or SIGTERM arrived, if any. A signal that lands while an
    error unwinds the stack (e.g. torchrun's SIGTERM to the ranks that survive one that died, just as
    their collective fails) is raised from a `finally` on the way, with that error as its context: the
    command had already failed, and its line says why."""
    seen: BaseException | None = interrupt.__context__
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__context__
    return None


def user_errors(fn: F) -> F:
    """Decorator for typer commands: UserError -> 'error: ...' (one line), exit code 2; Ctrl-C and SIGTERM
    -> 'interrupted' (or, for torchrun's SIGTERM, that torchrun stopped the rank), 130 (in an `fs` / `engine`
    process, cli/signals.py: once the command has ended, a signal is ignored).
    Warnings of probe-distill's own categories (e.g. `DatasetWarning`) print as one 'warning: ...' line
    on stderr; other libraries' warnings keep Python's format."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        failed = True
        try:
            with warnings.catch_warnings():  # restores showwarning afterwards
                original = warnings.showwarning

                def show(message, category, filename, lineno, file=None, line=None):
                    if _ours(category):
                        print(f"warning: {message}", file=sys.stderr, flush=True)
                    else:
                        original(message, category, filename, lineno, file, line)

                warnings.showwarning = show
                with command_signals():
                    result = fn(*args, **kwargs)
                    failed = False
                    return result
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            decided = _error_in_flight(exc)
            if decided is not None:  # the signal came while that error was on its way out: it is the outcome
                print(f"error: {decided}", file=sys.stderr)
                raise typer.Exit(decided.exit_code) from None
            print(interrupted_line(), file=sys.stderr)
            raise typer.Exit(INTERRUPTED) from None
        finally:
            # zarr's own exit handler closes its IO loop after waiting only 0.2 s for the thread, which
            # prints a traceback after our last line on a loaded machine (issue 20, defect 4).
            stop_zarr_io_thread(after_error=failed)

    return wrapper  # type: ignore[return-value]
