"""The real side at ImageNet scale: the whole-split real gradient, measured on this machine and extrapolated.

What is measured, per feature dimension D:
1. random features (N(0, 1), fp16) and random labels are written to a chunked Zarr v3 array ON DISK,
   laid out like a store's `features` array (rows x D, 1024-row chunks, no codec), in a temp dir that
   is deleted at the end;
2. the page cache of those files is dropped (fsync + posix_fadvise DONTNEED, best effort: a cold read),
   then the first N rows are read back chunk by chunk into a preallocated array of `--memory-dtype`
   (float32 by default: what `StoreSplit.load` + `StoreRealSource` hold, loaded once per run and reused
   every step): the one-off load time, its peak RSS growth, bytes on disk and in memory;
3. the WHOLE-SPLIT real gradient: one `engine.kernels.linear_ce_grad` call over all N loaded rows with a
   fresh random head W ~ N(0, 0.01^2) [C, D], b = 0 and random labels (what `--real-batch full` does
   every step), median seconds of `--repeats` calls after one warm call, and its peak extra memory
   (peak RSS growth during the call: /proc/self/clear_refs + VmHWM, with glibc told to mmap blocks of
   64 KiB or more so that freed memory leaves the resident set; as benchmarks/bench_kernel.py does).
   Sizes whose calls would exceed `--max-seconds` are measured on the first n rows of the loaded split
   and extrapolated linearly in N (the kernel is row-blocked: the cost per row does not depend on N);
   each row says "measured" or "extrapolated from n rows".

Computed, not measured: multiply-adds per step (two GEMMs of N*C*D each), what `--real-batch auto`
chooses on a CPU and on a GPU (`engine.real.plan_real_batch`, authors' batch ipc*augs*C with ipc=1,
augs=10), a datacenter-GPU estimate of the whole-split step from FLOPs and memory traffic at ASSUMED
rates (printed in the results), and the whole-run real-side cost of ImageNet-1k (5000 steps) in store
mode vs the authors' end-to-end mode.

    python -m benchmarks.bench_real_scale            # default sizes: 9.5 min on 2 busy CPU cores (measured)
    python -m benchmarks.bench_real_scale --quick    # a small subset, < 1 min
    python -m benchmarks.bench_real_scale --n 10000 100000 --c 1000 --d 768 --max-seconds 60
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_real_scale_estimate import (AUGS, GPU_ASSUMPTIONS, IMAGENET_TRAIN_ROWS, IPC, gpu_seconds,
                                                  macs_per_step, plan, whole_run)
from benchmarks.bench_real_scale_measure import (CHUNK_ROWS, Calibration, available_memory, load_split,
                                                 measure_grad, measure_load, write_split)
from benchmarks.bench_real_scale_report import busy_note, conclusions, markdown
from benchmarks.common import RESULTS_DIR, fmt_bytes, machine_line, write_results
from benchmarks.harness import mmap_large_blocks
from engine.real import REAL_MACS_BUDGET

DEFAULT_N = [10_000, 100_000, 320_000, IMAGENET_TRAIN_ROWS]
DEFAULT_C = [10, 100, 1000]
DEFAULT_D = [384, 768, 1024]
QUICK = {"n": [10_000, 100_000], "c": [10, 1000], "d": [384], "max_seconds": 6.0}


def run_dim(d: int, args: argparse.Namespace, work: Path, log) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (N, C) row of one feature dimension: its split written to disk, each N loaded once, then the
    gradient of each C calibrated and measured (on a prefix where the whole N would not fit)."""
    root = work / f"d{d}"
    n_disk, info = write_dim_split(d, args, work, root, log)
    loads = measure_loads(root, d, n_disk, args, log)
    grads = measure_grads(root, d, n_disk, args, log)
    rows = [dim_row(n, c, d, *grads[c], loads, args) for c in args.c for n in sorted(args.n)]
    shutil.rmtree(root, ignore_errors=True)
    return rows, info


def write_dim_split(d: int, args: argparse.Namespace, work: Path, root: Path, log) -> tuple[int, dict[str, Any]]:
    """The largest N's rows written under `root` (fewer when the disk is short: larger N are then
    extrapolated); the rows on disk and what the write took."""
    n_disk = max(args.n)
    bytes_per_row_disk = d * 2 + 8
    free_disk = shutil.disk_usage(work).free
    info: dict[str, Any] = {"d": d}
    if n_disk * bytes_per_row_disk * 1.05 + 2**30 > free_disk:
        fit = int((free_disk - 2**30) / (bytes_per_row_disk * 1.05)) // CHUNK_ROWS * CHUNK_ROWS
        info["disk_note"] = (f"only {fmt_bytes(free_disk)} free in {work}: wrote {fit} of {n_disk} rows; "
                             f"larger N are extrapolated")
        log(info["disk_note"])
        n_disk = max(CHUNK_ROWS, fit)
    written = write_split(root, n_disk, d, seed=d)
    info.update(written)
    log(f"D={d}: wrote {n_disk} rows fp16 ({fmt_bytes(written['bytes_on_disk'])} on disk) in {written['write_s']:.1f} s")
    return n_disk, info


def measure_loads(root: Path, d: int, n_disk: int, args: argparse.Namespace, log) -> dict[int, dict[str, Any]]:
    """The one-off load of each N (cold read, then freed); skipped when not on disk or short of memory."""
    mem_dtype = np.dtype(args.memory_dtype)
    loads: dict[int, dict[str, Any]] = {}
    margin = args.memory_margin_gib * 2**30

    def memory_short(rows_needed: int) -> str | None:
        need = rows_needed * (d * mem_dtype.itemsize + 8)
        avail = available_memory()
        if avail is not None and need + margin > avail:
            return f"needs {fmt_bytes(need)}, {fmt_bytes(avail)} available"
        return None

    for n in sorted(args.n):
        if n > n_disk:
            loads[n] = {"status": "skipped (not on disk)"}
        elif memory_short(n):
            loads[n] = {"status": f"skipped ({memory_short(n)})"}
        else:
            loads[n] = {"status": "measured", **measure_load(root, n, mem_dtype)}
        if loads[n]["status"] == "measured":
            log(f"  load N={n}: {loads[n]['load_s']:.2f} s -> {fmt_bytes(loads[n]['bytes_in_memory'])} in memory "
                f"as {args.memory_dtype} (peak +{fmt_bytes(loads[n]['load_peak_extra_bytes'])})")
        else:
            log(f"  load N={n}: {loads[n]['status']}")
    return loads


def measure_grads(root: Path, d: int, n_disk: int, args: argparse.Namespace,
                  log) -> dict[int, tuple[Calibration, dict[int, int]]]:
    """Per C, the gradient calibrated on a small prefix, then each N measured directly or on the largest
    prefix that fits the time limit, the rows on disk and the available memory: C -> (the measurements,
    N -> the rows N was measured on)."""
    ns = sorted(args.n)
    mem_dtype = np.dtype(args.memory_dtype)
    torch_dtype = torch.float32 if args.memory_dtype == "float32" else torch.float16
    margin = args.memory_margin_gib * 2**30
    grads: dict[int, tuple[Calibration, dict[int, int]]] = {}
    calibration_rows = min(ns[0], n_disk, 10_000)
    feats_np, labels_np = load_split(root, calibration_rows, mem_dtype)   # warm-up / calibration set
    for c in args.c:
        cal = Calibration()
        # feats_np may already hold more rows (loaded for an earlier C): the calibration uses the first rows.
        cal.measured[calibration_rows] = measure_grad(torch.from_numpy(feats_np[:calibration_rows]).to(torch_dtype),
                                                      torch.from_numpy(labels_np[:calibration_rows]), c, 1, seed=c)
        # The largest prefix that fits the time limit, the rows on disk and the available memory.
        avail = available_memory()
        held = feats_np.nbytes + labels_np.nbytes
        rows_mem = n_disk if avail is None else int((avail + held - margin) / (d * mem_dtype.itemsize + 8))
        rows_time = int(args.max_seconds / (cal.per_row() * (args.repeats + 1)))
        cap = min(rows_time, rows_mem, n_disk)
        targets = {n: n if n <= cap else max(calibration_rows, cap // CHUNK_ROWS * CHUNK_ROWS) for n in ns}
        for size in sorted(set(targets.values())):
            if size in cal.measured and cal.measured[size]["calls"] >= args.repeats:
                continue
            if feats_np.shape[0] < size:
                del feats_np, labels_np
                feats_np, labels_np = load_split(root, size, mem_dtype)
            feats = torch.from_numpy(feats_np[:size]).to(torch_dtype)
            cal.measured[size] = measure_grad(feats, torch.from_numpy(labels_np[:size]), c, args.repeats, seed=c)
            m = cal.measured[size]
            log(f"  grad C={c} D={d} on {size} rows: {m['median_s']:.3f} s/call "
                f"({2 * macs_per_step(size, c, d) / m['median_s'] / 1e9:.1f} GFLOP/s), "
                f"peak +{fmt_bytes(m['grad_peak_extra_bytes'])}")
        grads[c] = (cal, targets)
    del feats_np, labels_np
    return grads


def load_figures(n: int, loads: dict[int, dict[str, Any]]) -> tuple[float | None, float | None, str]:
    """The one-off load of N rows: (seconds, seconds reading several chunks per read, how it was had):
    measured, or extrapolated from the largest load measured."""
    load = loads[n]
    measured_loads = [(rows, r) for rows, r in loads.items() if r["status"] == "measured"]
    load_bulk_s = None
    if load["status"] == "measured":
        load_s, load_bulk_s, load_how = load["load_s"], load["load_bulk_s"], "measured"
    elif measured_loads:
        ln, lr = max(measured_loads)
        load_s, load_how = lr["load_s"] * n / ln, f"extrapolated from {ln} rows ({load['status']})"
        load_bulk_s = lr["load_bulk_s"] * n / ln
    else:
        load_s, load_how = None, load["status"]
    return load_s, load_bulk_s, load_how


def dim_row(n: int, c: int, d: int, cal: Calibration, targets: dict[int, int], loads: dict[int, dict[str, Any]],
            args: argparse.Namespace) -> dict[str, Any]:
    """The row of one (N, C, D): measured and extrapolated figures beside the computed ones."""
    mem_dtype = np.dtype(args.memory_dtype)
    m = cal.measured[targets[n]]
    exact = targets[n] == n
    seconds = m["median_s"] * n / targets[n]
    load = loads[n]
    load_s, load_bulk_s, load_how = load_figures(n, loads)
    cpu_rows, cpu_choice = plan(n, c, d, "cpu")
    gpu_rows, gpu_choice = plan(n, c, d, "cuda")
    return {
        "n": n, "c": c, "d": d, "macs_per_step": macs_per_step(n, c, d),
        "gflop_per_step": 2 * macs_per_step(n, c, d) / 1e9,
        "cpu_s_per_step": seconds,
        "cpu_how": "measured" if exact else f"extrapolated from {targets[n]} rows",
        "cpu_gflops": 2 * macs_per_step(targets[n], c, d) / m["median_s"] / 1e9,
        "grad_peak_extra_bytes": m["grad_peak_extra_bytes"],
        "bytes_on_disk": n * d * 2, "bytes_in_memory": n * d * mem_dtype.itemsize + n * 8,
        "load_s": load_s, "load_bulk_s": load_bulk_s, "load_how": load_how,
        "load_peak_extra_bytes": load.get("load_peak_extra_bytes"), "load_cold": load.get("cold_read"),
        "auto_cpu_rows": cpu_rows, "auto_cpu": cpu_choice,
        "auto_cpu_s_per_step": seconds * cpu_rows / n,
        "auto_gpu_rows": gpu_rows, "auto_gpu": gpu_choice,
        "gpu_fp32_s_per_step": gpu_seconds(n, c, d, GPU_ASSUMPTIONS["fp32_tflops"]),
        "gpu_tf32_s_per_step": gpu_seconds(n, c, d, GPU_ASSUMPTIONS["tf32_tflops"]),
        "gpu_whole_split_bytes": n * d * 4,
    }


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class TimedLog:
    """Lines on stderr stamped with the seconds since the bench started; the 1-min load average sampled at
    each (this run's threads included)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.load_start = round(os.getloadavg()[0], 2)
        self.load_samples: list[float] = []

    def __call__(self, msg: str) -> None:
        self.load_samples.append(round(os.getloadavg()[0], 2))
        print(f"[{time.perf_counter() - self.started:6.0f} s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=DEFAULT_N, help="rows of the split")
    p.add_argument("--c", type=int, nargs="+", default=DEFAULT_C, help="classes")
    p.add_argument("--d", type=int, nargs="+", default=DEFAULT_D, help="feature dimensions")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="longest gradient measurement (all its calls); larger sizes are measured on a prefix "
                        "and extrapolated linearly in N")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measured size (median reported)")
    p.add_argument("--memory-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype the split is held in after loading (the engine: float32)")
    p.add_argument("--memory-margin-gib", type=float, default=4.0,
                   help="skip a load that would leave less than this much memory available")
    p.add_argument("--quick", action="store_true", help=f"small subset: {QUICK}")
    p.add_argument("--work-dir", default=None, help="where the temp Zarr files go (default: the system temp dir)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default="bench_real_scale")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.c, args.d, args.max_seconds = QUICK["n"], QUICK["c"], QUICK["d"], min(args.max_seconds,
                                                                                          QUICK["max_seconds"])
    return args


def measure_dims(args: argparse.Namespace, log: TimedLog) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every dimension in a temp folder deleted at the end: the rows in (N, C, D) order, the writes."""
    work = Path(tempfile.mkdtemp(prefix="bench_real_scale_", dir=args.work_dir))
    rows: list[dict[str, Any]] = []
    infos = []
    try:
        for d in args.d:
            dim_rows, info = run_dim(d, args, work, log)
            rows += dim_rows
            infos.append(info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: (r["n"], r["c"], r["d"]))
    return rows, infos


def run_meta(args: argparse.Namespace, rows: list[dict[str, Any]], infos: list[dict[str, Any]],
             log: TimedLog) -> dict[str, Any]:
    """How the rows were measured: options, the machine's load, the assumptions, the disk writes."""
    load_end = round(os.getloadavg()[0], 2)
    cores = os.cpu_count() or 1
    meta = {"memory_dtype": args.memory_dtype, "repeats": args.repeats, "max_seconds": args.max_seconds,
            "torch_threads": torch.get_num_threads(), "load_average_start": log.load_start, "load_average_end": load_end,
            "load_average_max_during": max(log.load_samples + [load_end]),
            "cold_reads": all(r["load_cold"] for r in rows if r["load_how"] == "measured"),
            "memory_method": "peak RSS growth during the call (/proc/self/clear_refs + VmHWM, glibc mmap threshold "
                             "64 KiB), in this process",
            "chunk_rows": CHUNK_ROWS, "ipc": IPC, "augs": AUGS, "real_macs_budget": REAL_MACS_BUDGET,
            "gpu_assumptions": GPU_ASSUMPTIONS, "writes": infos, "wall_seconds": None}
    meta["busy_note"] = busy_note(meta, cores)
    meta["wall_seconds"] = round(time.perf_counter() - log.started, 1)
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mmap_large_blocks()
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so the temp Zarr files are deleted.
    signal.signal(signal.SIGTERM, _interrupt)
    log = TimedLog()
    log(f"bench_real_scale: {machine_line()}; load average {log.load_start}")
    rows, infos = measure_dims(args, log)
    run = whole_run(rows)
    meta = run_meta(args, rows, infos, log)
    meta["conclusions"] = conclusions(rows, run)
    md = markdown(rows, run, meta)
    json_path, md_path = write_results(args.name, {"meta": meta, "rows": rows, "imagenet_run": run}, md, args.out_dir)
    print(md)
    log(f"wrote {json_path} and {md_path} ({meta['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
