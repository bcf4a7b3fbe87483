"""How the benchmarks run things (benchmarks/common.py: what they write): a distillation run that continues
where it stopped, the peak memory of a piece of code (read through engine.distill.memory, as a run records
it), child processes killed as a group at a timeout, and the start of a Fashion-MNIST bench.

The benchmarks are modules: run them from the repository root as `python -m benchmarks.<name>` (as the
Makefile does), so `benchmarks`, `engine` and `featurestore` are this checkout's."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The engine is imported where it is used: `make gpu-check` without CUDA must answer in a moment.

REPO_ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------- distill or resume


def run_finished(out: Path) -> bool:
    """Whether the run in `out` finished (its distilled set is written)."""
    from engine.distill.outdir import DISTILLED_FILE

    return (out / DISTILLED_FILE).is_file()


# A child process that distills one run: DistillConfig fields as JSON in argv[1].
_DISTILL_IN_CHILD = ("import json, sys\nfrom engine.distill import DistillConfig, distill\n"
                     "distill(DistillConfig(**json.loads(sys.argv[1])))")


def distill_unless_done(out: Path, config: dict[str, Any], isolated: bool = False) -> bool:
    """Distill into `out` (`config`: DistillConfig fields but `out` and `resume`) unless the run there
    finished; continue it from its checkpoint when one is there. What a run that died before its first
    checkpoint left is removed first, unless a live run holds the folder (distill then refuses, naming it).
    `isolated`: in a child process, so that its peak memory is its own, not the bench's high-water mark, and
    a failure is a RuntimeError with the child's last line. Returns whether it distilled now."""
    from engine.distill.outdir import CHECKPOINT_FILE
    from featurestore.runtime import is_locked

    if run_finished(out):
        return False
    resume = (out / CHECKPOINT_FILE).is_file()
    if out.exists() and not resume and is_locked(out) is None:
        shutil.rmtree(out)
    config = {**config, "out": str(out), "resume": resume}
    if isolated:
        child = run_child([sys.executable, "-c", _DISTILL_IN_CHILD, json.dumps(config)])
        if not child.ok:
            raise RuntimeError(child.reason())
    else:
        from engine.distill import DistillConfig, distill

        distill(DistillConfig(**config))
    return True


# ------------------------------------------------------------------------------------------- peak memory

_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def mmap_large_blocks() -> None:
    """Have glibc mmap every block of 64 KiB or more, so freed memory leaves the resident set and the RSS
    tracks live memory (call once, at the start of a process that measures peaks on a CPU)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        except (OSError, AttributeError):  # not glibc: RSS may then under-count reused heap blocks
            pass


class PeakExtraMemory:
    """`with PeakExtraMemory(device) as memory: ...`; then `memory.extra_bytes`: the peak during the block
    above the memory in use at its start (CUDA allocated; on a CPU the RSS, its high-water mark reset at
    the start). `fresh` is False where the mark cannot be reset: the growth of the process's own peak is
    reported instead, which under-counts when the process peaked higher before."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.fresh = False
        self.base_mb = self.peak_mb = 0.0

    def __enter__(self) -> PeakExtraMemory:
        from engine.distill.memory import current_memory_mb, peak_memory_mb, reset_peak_memory

        self.fresh = reset_peak_memory(self.device)
        self.base_mb = current_memory_mb(self.device) if self.fresh else peak_memory_mb(self.device)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        from engine.distill.memory import peak_memory_mb

        self.peak_mb = peak_memory_mb(self.device)

    @property
    def extra_bytes(self) -> float:
        return (self.peak_mb - self.base_mb) * 2**20


# ----------------------------------------------------------------------------------------- child processes

@dataclass
class ChildRun:
    """How a child process ended; `returncode` None: killed at its timeout."""
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    timeout: float | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def reason(self) -> str:
        """Why it failed, in one line: the timeout, the signal, or the exit status and its last line."""
        if self.timed_out:
            return f"timed out after {self.timeout:.0f} s (killed)"
        if self.returncode is not None and self.returncode < 0:
            name = signal.Signals(-self.returncode).name  # SIGKILL unasked for is usually the OOM killer
            return f"killed by {name}" + (" (most likely out of memory)" if name == "SIGKILL" else "")
        lines = [line for line in (self.stderr or self.stdout).splitlines() if line.strip()]
        return f"exit {self.returncode}: {lines[-1] if lines else 'no output'}"

    def last_json(self) -> Any:
        """The JSON the child printed last on stdout (how a bench's child hands back its measurement)."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's whole process group (torchrun's and DataLoader's workers too), SIGKILL
    5 s later if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(cmd: list[str], timeout: float | None = None, log: Path | None = None,
              env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> ChildRun:
    """`cmd` in a fresh process. With a `timeout`, in its own session, killed as a group at `timeout`
    seconds; without, in the caller's group, so that a group kill of the caller (a timed-out gpu_check
    part) reaches it too. Its output goes to files, not pipes (a chatty child never blocks); with `log`,
    stdout and stderr both go there (readable while it runs) and come back as `stdout`; without, they
    come back apart. Interrupted (Ctrl-C), the child is stopped before the exception goes on."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+", errors="replace") as err_file, \
            (open(log, "w+", errors="replace") if log is not None
             else tempfile.TemporaryFile("w+", errors="replace")) as out_file:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                stdout=out_file, stderr=subprocess.STDOUT if log is not None else err_file,
                                start_new_session=timeout is not None)
        try:
            returncode: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            returncode = None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        out_file.seek(0)
        err_file.seek(0)
        return ChildRun(returncode, time.perf_counter() - start, out_file.read(), err_file.read(), timeout)


# ------------------------------------------------------------------------------ a Fashion-MNIST bench


def fashion_mnist_refused(data_root: str | None) -> bool:
    """Say in one line (stderr) why the Fashion-MNIST benches cannot run here, and return True (main then
    returns 2); False when they can."""
    from benchmarks.common import fashion_mnist_missing

    missing = fashion_mnist_missing(data_root)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
    return missing is not None
