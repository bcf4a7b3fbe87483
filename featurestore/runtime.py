"""Small runtime helpers shared by both stages: device choice, atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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


def require_new_dir(path: str | os.PathLike, hint: str = "choose a new directory or remove it",
                    error: type[UserError] = UserError) -> Path:
    """`path` as a Path if it does not exist or is an empty directory; else `error` (one line) with `hint`."""
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise error(f"--out {path} exists and is not empty: {hint}")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the usual umask-derived mode instead.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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
