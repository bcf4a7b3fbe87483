"""Launching `fs` / `engine` under a real torchrun (2 gloo ranks on the CPU) and SIGKILLing one rank at a
known point: what the surviving ranks print and exit with (issue 20).

Each rank runs RUNNER (the command's own `main`, after optional hooks): its stderr goes to its own file
(torchrun's summary, on torchrun's stderr, is kept apart) and its exit status is recorded. A hook wraps a
function of one rank: at its n-th call it writes `<logs>/rank<r>.marker` (the rank's pid) and, with
`pause`, stops there for good, so the test kills that rank at exactly that point instead of guessing with
sleeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
TIMEOUT_S = 300  # generous: two ranks importing torch on a loaded 2-core machine take ~10 s, not minutes

RUNNER = r'''
import importlib, json, os, sys, time

rank, logs = int(os.environ["RANK"]), os.environ["KILL_TEST_LOGS"]
err = os.open(os.path.join(logs, f"rank{rank}.stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.dup2(err, 2)
with open(os.path.join(logs, f"rank{rank}.pid"), "w") as fh:
    fh.write(str(os.getpid()))


def hook(target, call, pause):
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part)
    original, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            marker = os.path.join(logs, f"rank{rank}.marker")
            with open(marker + ".tmp", "w") as fh:
                fh.write(str(os.getpid()))
            os.replace(marker + ".tmp", marker)
            while pause:
                time.sleep(60)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


for spec in json.loads(os.environ.get("KILL_TEST_HOOKS", "[]")):
    if spec["rank"] == rank:
        hook(spec["target"], spec["call"], spec["pause"])
command = sys.argv[1]
sys.argv = [command.split(".")[-1], *sys.argv[2:]]
code = 0
try:
    importlib.import_module(command).main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    raise
finally:
    with open(os.path.join(logs, f"rank{rank}.exit"), "w") as fh:
        fh.write(str(code))
'''


@dataclass
class Rank:
    exit_code: int | None  # None: the process did not end through its `main` (killed)
    stderr: str


class Launch:
    """`torchrun --standalone --nproc-per-node 2` running `python -m <command> <args>` through RUNNER."""

    def __init__(self, logs: Path, command: str, args: list[str], hooks: list[dict] | None = None) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        runner = logs / "runner.py"
        runner.write_text(RUNNER)
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
        env.update(PYTHONPATH=str(REPO), KILL_TEST_LOGS=str(logs), KILL_TEST_HOOKS=json.dumps(hooks or []))
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--no-python", sys.executable, str(runner),
               command, *args]
        # Its own session, so that a failing test can kill it (the ranks get sessions of their own: `kill`).
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)

    def wait_for_marker(self, rank: int) -> int:
        """The pid in rank `rank`'s marker, once its hook wrote it (the launch must still be running)."""
        marker = self.logs / f"rank{rank}.marker"
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                pytest.fail(f"torchrun ended before rank {rank} got to its hook: {err[-3000:]}{self.stderr(0)}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"rank {rank} did not get to its hook in {TIMEOUT_S} s")
            time.sleep(0.01)
        return int(marker.read_text())

    def finish(self) -> tuple[int, str]:
        """(torchrun's exit status, torchrun's stderr) once it has ended."""
        try:
            _out, err = self.proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"torchrun did not end in {TIMEOUT_S} s (a rank left waiting?)")
        return self.proc.returncode, err

    def kill(self) -> None:
        """Kill the launcher and the ranks it started (each rank in a session of its own, by its pid)."""
        running = self.proc.poll() is None
        if running:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid_file in self.logs.glob("rank*.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if running:
            self.proc.communicate()

    def stderr(self, rank: int) -> str:
        path = self.logs / f"rank{rank}.stderr"
        return path.read_text() if path.exists() else ""

    def rank(self, rank: int) -> Rank:
        path = self.logs / f"rank{rank}.exit"
        return Rank(int(path.read_text()) if path.exists() else None, self.stderr(rank))


@contextmanager
def launches() -> Iterator[Callable[..., Launch]]:
    """`start(logs, command, args, hooks)` starts a Launch; whatever is still running at the end (a failed
    assertion) is killed, ranks included."""
    started: list[Launch] = []

    def start(*args, **kwargs) -> Launch:
        started.append(Launch(*args, **kwargs))
        return started[-1]

    try:
        yield start
    finally:
        for launch in started:
            launch.kill()
