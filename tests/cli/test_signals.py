"""Ctrl-C and SIGTERM at any moment of an `fs` / `engine` process: one line and exit 130, or, once the
outputs are complete, no effect (issue 20, defect 6). Each test runs the console script's entry point in a
subprocess that pauses at a named point (an import hook: a marker file says it is there), sends the signal,
then lets it go on. Each fails on the CLI as it was before (the docstrings say how)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cli.signals import INTERRUPTED, STARTING_LINE, TORCHRUN_STOPPED_LINE

REPO = Path(__file__).resolve().parents[2]
BACKBONE = "test-cnn"

# Installed before the entry point is imported: pauses when MODULE is imported (no FUNCTION), or each time
# MODULE.FUNCTION is called, until the test creates the release file.
_PAUSE_HOOK = textwrap.dedent("""
    import importlib.abc, importlib.util, os, sys, time
    from pathlib import Path

    MODULE, _, FUNCTION = os.environ["PD_TEST_PAUSE_AT"].partition(":")
    MARKER = Path(os.environ["PD_TEST_PAUSE_MARKER"])

    def pause():
        MARKER.touch()
        deadline = time.monotonic() + 300
        while not MARKER.with_suffix(".release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    class PauseHook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != MODULE:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_and_pause(module):
                if not FUNCTION:
                    pause()
                exec_module(module)
                if FUNCTION:
                    original = getattr(module, FUNCTION)

                    def paused(*args, **kwargs):
                        pause()
                        return original(*args, **kwargs)

                    setattr(module, FUNCTION, paused)

            spec.loader.exec_module = exec_and_pause
            return spec

    sys.meta_path.insert(0, PauseHook())
""")


def _start(tmp_path: Path, cli: str, args: list[str], pause_at: str,
           extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """`cli args` as its console script runs it (`from cli.<cli> import main; main()`), pausing at
    `pause_at` ("module" or "module:function"); returns once it is there."""
    marker = tmp_path / f"paused-{time.monotonic_ns()}"
    script = _PAUSE_HOOK + f"sys.argv = [{cli!r}, *{args!r}]\nfrom cli.{cli} import main\nmain()\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PD_TEST_PAUSE_AT": pause_at, "PD_TEST_PAUSE_MARKER": str(marker),
           **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # generous: a loaded 2-core machine starts slowly
    while not marker.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"never reached {pause_at}: rc {proc.returncode}\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.05)
    return proc, marker


def _signal_and_release(proc: subprocess.Popen, marker: Path, sig: signal.Signals) -> tuple[str, str]:
    proc.send_signal(sig)
    marker.with_suffix(".release").touch()  # a handled signal is run before the pause looks at this file
    out, err = proc.communicate(timeout=600)
    return out, err


def _distill_args(store: Path, out: Path) -> list[str]:
    return ["distill", "--store", str(store), "--backbone", BACKBONE, "--out", str(out), "--steps", "2",
            "--augs", "1", "--ipc", "1", "--param", "pixels", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def store(make_gratings_store) -> Path:
    return make_gratings_store(BACKBONE, limit_per_class=2, dtype="fp32")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("cli", ["engine", "fs"])
def test_a_signal_while_the_modules_load_is_one_line(tmp_path, cli, sig):
    """Before: Ctrl-C while `import torch` ran printed a KeyboardInterrupt traceback (once a RecursionError);
    SIGTERM ended the process with -15 and no line."""
    args = (_distill_args(tmp_path / "no-store", tmp_path / "out") if cli == "engine"
            else ["build", "gratings", "--backbone", BACKBONE, "--store", str(tmp_path / "s"), "--quiet"])
    proc, marker = _start(tmp_path, cli, args, "torch")
    out, err = _signal_and_release(proc, marker, sig)
    assert proc.returncode == INTERRUPTED, err
    assert err.strip() == STARTING_LINE and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([marker.name, marker.name + ".release"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_a_distillations_setup_is_one_line(store, tmp_path, sig):
    """Before: SIGTERM while the store and the backbone loaded ended the run with -15 and no line."""
    out_dir = tmp_path / "out"
    proc, marker = _start(tmp_path, "engine", _distill_args(store, out_dir), "engine.distill.prepare:prepare")
    out, err = _signal_and_release(proc, marker, sig)
    assert proc.returncode == INTERRUPTED, err
    assert err.strip() == "interrupted" and out == ""
    assert not (out_dir / "config.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("cli", ["engine", "fs"])
def test_torchruns_sigterm_outside_a_collective_says_torchrun_stopped_the_rank(store, tmp_path, cli, sig):
    """Before: a rank that torchrun stopped (its SIGTERM to every rank once one fails) while it computed
    outside any collective printed a bare `interrupted`, which does not say why. A process that torchrun
    started (TORCHELASTIC_RUN_ID in its environment) now says torchrun stopped it; Ctrl-C stays
    `interrupted`."""
    if cli == "engine":
        args, pause_at = _distill_args(store, tmp_path / "out"), "engine.distill.prepare:prepare"
    else:
        args = ["build", "gratings", "--backbone", BACKBONE, "--store", str(tmp_path / "s"), "--quiet",
                "--limit-per-class", "2"]
        pause_at = "featurestore.build:_compute_units"
    proc, marker = _start(tmp_path, cli, args, pause_at, {"TORCHELASTIC_RUN_ID": "test-run"})
    out, err = _signal_and_release(proc, marker, sig)
    assert proc.returncode == INTERRUPTED, err
    assert err.strip() == (TORCHRUN_STOPPED_LINE if sig == signal.SIGTERM else "interrupted") and out == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_after_the_summary_leaves_a_finished_run_finished(store, tmp_path, sig):
    """Before: SIGTERM after the summary was printed ended with 143 (-15) although every output was
    written; Ctrl-C there printed a traceback."""
    out_dir = tmp_path / "out"
    proc, marker = _start(tmp_path, "engine", _distill_args(store, out_dir), "cli.common:stop_zarr_io_thread")
    out, err = _signal_and_release(proc, marker, sig)
    assert proc.returncode == 0, err
    assert out.startswith("distilled ") and "Traceback" not in err and "interrupted" not in err
    assert (out_dir / "distilled.safetensors").is_file()


def test_a_signal_while_an_error_unwinds_keeps_the_error_line():
    """Before: a signal that landed while a command's error was on its way out (torchrun's SIGTERM to the
    ranks that survive a dead one, just as their collective fails) replaced that error's line with
    `interrupted` (130). A KeyboardInterrupt raised on the way out carries the error as its context: the
    command had already failed, and its line and exit code stand."""
    import typer
    from typer.testing import CliRunner

    from cli.common import user_errors
    from featurestore.errors import UserError

    app = typer.Typer()

    @app.command()
    @user_errors
    def fails() -> None:
        try:
            raise UserError("rank 1 of 2 stopped")
        finally:
            raise KeyboardInterrupt  # what the signal handler raises there

    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2 and result.stderr == "error: rank 1 of 2 stopped\n" and result.stdout == ""
