"""What bench_real_scale measures on this machine: random features laid out like a store's `features` array,
written to disk and read back (time, peak memory, bytes), and the whole-split real gradient over them
(time, peak memory), with the seconds per row larger sizes are extrapolated from."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import PeakExtraMemory
from engine.kernels import linear_ce_grad

CHUNK_ROWS = 1024          # featurestore.schema.DEFAULT_CHUNK_ROWS
WRITE_ROWS = 64 * CHUNK_ROWS
BULK_CHUNKS = 64            # chunks per read in the comparison load


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def drop_page_cache(path: Path) -> bool:
    """fsync + POSIX_FADV_DONTNEED on every file under `path` (only these files; best effort)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    ok = True
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                ok = False
            finally:
                os.close(fd)
    return ok


def write_split(root: Path, n: int, d: int, seed: int) -> dict[str, Any]:
    """features fp16 [n, d] and labels int64 [n] in [0, 1000) as chunked Zarr v3 arrays under root."""
    import zarr

    feats = zarr.create_array(store=str(root / "features"), shape=(n, d), chunks=(CHUNK_ROWS, d), dtype="float16",
                              compressors=None, fill_value=np.nan)
    labels = zarr.create_array(store=str(root / "labels"), shape=(n,), chunks=(CHUNK_ROWS,), dtype="int64",
                               compressors=None, fill_value=-1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for lo in range(0, n, WRITE_ROWS):
        hi = min(n, lo + WRITE_ROWS)
        feats[lo:hi] = torch.randn(hi - lo, d, generator=gen).half().numpy()
        labels[lo:hi] = torch.randint(0, 1000, (hi - lo,), generator=gen).numpy()
    seconds = time.perf_counter() - start
    return {"rows": n, "write_s": seconds, "bytes_on_disk": dir_bytes(root / "features"),
            "label_bytes_on_disk": dir_bytes(root / "labels")}


def load_split(root: Path, n: int, dtype: np.dtype, rows_per_read: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The first n rows into preallocated arrays, one chunk per read by default (as
    featurestore.store.StoreSplit.load does), or `rows_per_read` rows (several chunks) per read."""
    import zarr

    feats = zarr.open_array(str(root / "features"), mode="r")
    labels = zarr.open_array(str(root / "labels"), mode="r")
    out = np.empty((n, feats.shape[1]), dtype=dtype)
    out_labels = np.empty((n,), dtype=np.int64)
    for lo in range(0, n, rows_per_read):
        hi = min(n, lo + rows_per_read)
        out[lo:hi] = feats[lo:hi]
        out_labels[lo:hi] = labels[lo:hi]
    return out, out_labels


def measure_load(root: Path, n: int, dtype: np.dtype) -> dict[str, Any]:
    cold = drop_page_cache(root)
    with PeakExtraMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        feats, labels = load_split(root, n, dtype)
        seconds = time.perf_counter() - start
    peak = int(memory.extra_bytes) if memory.fresh else None
    in_memory = feats.nbytes + labels.nbytes
    del feats, labels
    # The same rows read BULK_CHUNKS chunks per read: how much of the load is Zarr's per-read overhead.
    drop_page_cache(root)
    start = time.perf_counter()
    feats, labels = load_split(root, n, dtype, rows_per_read=BULK_CHUNKS * CHUNK_ROWS)
    bulk = time.perf_counter() - start
    del feats, labels
    return {"load_s": seconds, "load_bulk_s": bulk, "load_peak_extra_bytes": peak, "bytes_in_memory": in_memory,
            "cold_read": cold}


def grad_call(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    linear_ce_grad(features, labels, weight, bias)


def measure_grad(features: torch.Tensor, labels: torch.Tensor, c: int, repeats: int, seed: int) -> dict[str, Any]:
    """One warm call (its peak extra RSS is the memory figure), then `repeats` timed calls."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c, features.shape[1], generator=gen) * 0.01
    bias = torch.zeros(c)
    labels = labels % c
    with PeakExtraMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        grad_call(features, labels, weight, bias)
        first = time.perf_counter() - start
    peak = int(memory.extra_bytes) if memory.fresh else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grad_call(features, labels, weight, bias)
        times.append(time.perf_counter() - start)
    return {"rows": features.shape[0], "median_s": statistics.median(times), "first_s": first,
            "grad_peak_extra_bytes": peak, "calls": repeats}


class Calibration:
    """Seconds per row of the whole-split gradient at one (C, D), from the largest measurement so far."""

    def __init__(self) -> None:
        self.measured: dict[int, dict[str, Any]] = {}

    def per_row(self) -> float | None:
        if not self.measured:
            return None
        rows = max(self.measured)
        return self.measured[rows]["median_s"] / rows


def available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - without psutil, no check
        return None
