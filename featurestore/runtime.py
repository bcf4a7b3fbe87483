"""Small runtime helpers shared by both stages: device choice, atomic file writes."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from .errors import UserError


def pick_device(device: str | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu. An explicit 'cuda' without a GPU is a user error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is visible; use --device cpu")
    return dev


def describe_os_error(exc: OSError) -> tuple[str, str]:
    """(what failed, what to do first) for an OSError of a write: the one-line messages of every stage."""
    detail = exc.strerror or str(exc)
    if exc.filename:
        detail += f": {exc.filename}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return detail, "free disk space"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return detail, "make it writable"
    return detail, "fix the cause"


@contextmanager
def write_errors(what: str, then: str, error: type[UserError] = UserError) -> Iterator[None]:
    """Turn an OSError raised in the block (disk full, permission lost, read-only file system) into one
    `error` line: "cannot write <what> (<detail>): <first step>, then <then>". Use it around writes only, so
    that a read error is never reported as a write error."""
    try:
        yield
    except OSError as exc:
        detail, first = describe_os_error(exc)
        raise error(f"cannot write {what} ({detail}): {first}, then {then}") from None


LOCK_FILE = ".lock"


class LockedError(UserError):
    """Another live process holds the lock of a store or an output directory."""


@contextmanager
def exclusive_lock(directory: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on `directory` (created if missing) for the block: `flock` on
    `directory/.lock`, released by the kernel when the process dies, so a killed run never leaves a stale
    lock. A second holder gets LockedError naming the first (pid, host, start time, command)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            raise LockedError(f"{what} {directory} is in use by another process ({holder}): wait for it to "
                              f"finish, or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def is_locked(directory: str | os.PathLike) -> str | None:
    """The holder's description when another process holds `directory`'s lock, else None (never blocks,
    writes nothing)."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
    finally:
        os.close(fd)
    return None


def require_new_dir(path: str | os.PathLike, hint: str = "choose a new directory or remove it",
                    error: type[UserError] = UserError) -> Path:
    """`path` as a Path if it does not exist or is an empty directory; else `error` (one line) with `hint`."""
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise error(f"--out {path} exists and is not empty: {hint}")
    return path


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def require_writable(path: str | os.PathLike, error: type[UserError] = UserError) -> None:
    """Refuse (one line) a directory that could not be created or written: checked before heavy work, so
    a run into a read-only place fails in a second, not after loading a store and a backbone."""
    path = Path(path).expanduser()
    if path.is_symlink() and not path.exists():
        # mkdir on a dangling link fails with FileExistsError; following it would create its target.
        raise error(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: create that "
                    f"directory, remove the link, or choose another path")
    existing = path  # the nearest part of the path that exists
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise error(f"{path}: {existing} is a file, not a directory: choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{path}: {existing} is not writable by this user: choose a writable path")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new empty directory next to `path` (same file system, so it can be renamed into place), with
    the permissions an ordinary `mkdir` would give (mkdtemp's are 0700, which would make the finished
    output private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    atomic_write_stream(path, lambda fh: fh.write(data))


def atomic_write_stream(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """`atomic_write_bytes` for content written by `write(file)` straight into the temp file (e.g.
    `torch.save`), so a large file is never held whole in memory as bytes first."""
    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            write(fh)

    atomic_write_path(path, to_file)


def atomic_write_path(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """`atomic_write_stream` for writers that take a file name (safetensors' `save_file`, which writes the
    tensors' memory straight to the file): `write(temp path)`, fsync, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        # mkstemp creates 0600 files; give the result the usual umask-derived mode instead.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def tool_version() -> str:
    """Installed distribution version, or the one in pyproject.toml when running from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("probe-distill")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            import tomllib

            return str(tomllib.loads(pyproject.read_text())["project"]["version"]) + "+source"
        except (OSError, KeyError, ValueError):
            return "unknown"


def _drop_abandoned_writes(loop, context: dict) -> None:
    """After a failed command, the other writes of zarr's batch end with errors nobody awaits (a full disk:
    the next write of a file its failed sibling left behind raises FileExistsError): asyncio would print
    each as 'Future exception was never retrieved' with a traceback, after the command's one line. The
    first failure is the one reported; these are its echoes."""
    if context.get("message") not in ("Future exception was never retrieved", "Task exception was never retrieved"):
        loop.default_exception_handler(context)


def stop_zarr_io_thread(timeout: float = 30.0, after_error: bool = False) -> None:
    """Stop zarr's IO event loop now, waiting up to `timeout` seconds for its thread.

    zarr stops that loop in an atexit handler that waits only 0.2 s for the thread and then closes the
    loop anyway: on a loaded machine (or right after a failed write, e.g. a full disk) the thread is
    often not scheduled in time, and `Cannot close a running event loop` is printed as a traceback
    after the command's own last line. Stopping it here, patiently, leaves that handler nothing to do.
    A later zarr call starts a new loop, so this is safe to call after every command. `after_error`: the
    command failed; its abandoned writes stay silent (`_drop_abandoned_writes`)."""
    sync = sys.modules.get("zarr.core.sync")
    if sync is None:
        return  # zarr was never imported: no loop
    with sync._get_lock():
        loop, thread = sync.loop[0], sync.iothread[0]
        if loop is None:
            return
        sync.loop[0] = None
        sync.iothread[0] = None
    if after_error:  # also for futures collected later, on the closed loop, at exit
        loop.set_exception_handler(_drop_abandoned_writes)
    if loop.is_closed():
        return
    loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join(timeout)
        if thread.is_alive():  # a daemon thread: it ends with the process; closing it now would raise
            return
    loop.close()
