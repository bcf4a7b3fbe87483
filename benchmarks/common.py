"""Shared by the benchmarks: the machine stamp, the results writer (JSON + markdown), the formats of their
tables (`markdown_table`, seconds and bytes as a reader reads them), the shared Fashion-MNIST store."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from featurestore.runtime import atomic_write_bytes

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORK_DIR = Path(__file__).resolve().parent / "work"  # the benches' stores and runs, kept between reruns


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge a number: CPU, cores, GPU, library versions, when."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    info = info or machine_info()
    gpu = info["gpu"] or "no GPU"
    return f"{info['cpu']}, {info['cores']} cores, {gpu}, torch {info['torch']}, {info['date']}"


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def write_results(name: str, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.md` (machine stamp at the top of both), each atomically (temp file +
    rename), so an interrupted or failed run leaves the last written results whole."""
    info = payload.setdefault("machine", machine_info())
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    atomic_write_bytes(json_path, (json.dumps(payload, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(md_path, f"# {name}\n\nMachine: {machine_line(info)}\n\n{markdown}".encode())
    return json_path, md_path


# The Fashion-MNIST store the quality benchmarks share (built once, reused by every rerun): 500 train
# images per class, the whole 10k test split, 112 px.
FASHION_MNIST_STORE = WORK_DIR / "fashion-mnist-112"
FASHION_MNIST_TRAIN_PER_CLASS = 500
FASHION_MNIST_IMAGE_SIZE = 112


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically (a reader never sees half a file) and close it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def fashion_mnist_missing(data_root: str | None = None) -> str | None:
    """Why the Fashion-MNIST benchmarks cannot run here (one line), or None when they can."""
    from featurestore.datasets import dataset_splits
    from featurestore.errors import UserError

    try:
        dataset_splits("fashion-mnist", data_root)
    except UserError as exc:
        return str(exc)
    return None


def fashion_mnist_store(backbones: list[str] | tuple[str, ...], store: Path = FASHION_MNIST_STORE,
                        data_root: str | None = None, device: str = "auto", views: int = 1) -> dict[str, float]:
    """Build (or find complete) the benchmark store for `backbones`; seconds spent per backbone."""
    import time

    from featurestore.build import build

    common = dict(data_root=data_root, image_size=FASHION_MNIST_IMAGE_SIZE, device=device, quiet=True)
    seconds = {}
    for backbone in backbones:
        t = time.perf_counter()
        build("fashion-mnist", backbone, store, splits=["train"], limit_per_class=FASHION_MNIST_TRAIN_PER_CLASS,
              views=views, **common)
        build("fashion-mnist", backbone, store, splits=["val"], **common)
        seconds[backbone] = round(time.perf_counter() - t, 1)
    return seconds
