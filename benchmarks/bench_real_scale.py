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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, machine_line, markdown_table, write_results
from benchmarks.harness import PeakExtraMemory, mmap_large_blocks
from engine.kernels import linear_ce_grad
from engine.real import REAL_MACS_BUDGET, plan_real_batch

IMAGENET_TRAIN_ROWS = 1_281_167
DEFAULT_N = [10_000, 100_000, 320_000, IMAGENET_TRAIN_ROWS]
DEFAULT_C = [10, 100, 1000]
DEFAULT_D = [384, 768, 1024]
QUICK = {"n": [10_000, 100_000], "c": [10, 1000], "d": [384], "max_seconds": 6.0}
CHUNK_ROWS = 1024          # featurestore.schema.DEFAULT_CHUNK_ROWS
WRITE_ROWS = 64 * CHUNK_ROWS
BULK_CHUNKS = 64            # chunks per read in the comparison load
IPC, AUGS = 1, 10           # the authors' ImageNet-1k setting: real batch ipc * augs * C

# Assumed datacenter-GPU rates (H100/H200 SXM class); nothing here was measured on a GPU.
GPU_ASSUMPTIONS = {
    "gpu": "H100 / H200 SXM class (one GPU)",
    "fp32_tflops": 50.0,     # IEEE fp32 GEMM, sustained (peak ~67 dense). torch's default fp32 matmul precision.
    "tf32_tflops": 200.0,    # TF32 tensor-core GEMM, sustained and conservative (peak ~495 dense).
    "hbm_tb_s": 3.0,         # memory bandwidth, sustained (H100 SXM 3.35 peak, H200 4.8 peak).
    "bf16_tflops_vit": 400.0,  # bf16 ViT-B forward under autocast, sustained (peak ~990 dense).
    "traffic_model": "bytes per step = 2 reads of the fp32 features (one per GEMM) + 4 passes over the fp32 "
                     "[N, C] logits block (GEMM write, softmax read + write, second GEMM read)",
    "time_model": "max(FLOPs / rate, bytes / bandwidth): a roofline lower bound, fine for the order of magnitude",
}
VIT_B14_GFLOPS_224 = 17.5  # per forward at 224 px: a stated assumption (see the notes in the results)
IMAGENET_RUN = {"n": IMAGENET_TRAIN_ROWS, "c": 1000, "d": 768, "steps": 5000}


def macs_per_step(n: int, c: int, d: int) -> int:
    """Multiply-adds of the whole-split gradient: logits Z W^T and G = A^T Z, N*C*D each."""
    return 2 * n * c * d


def gpu_seconds(n: int, c: int, d: int, tflops: float) -> float:
    flops = 2 * macs_per_step(n, c, d)
    traffic = 2 * n * d * 4 + 4 * n * c * 4
    return max(flops / (tflops * 1e12), traffic / (GPU_ASSUMPTIONS["hbm_tb_s"] * 1e12))


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


def plan(n: int, c: int, d: int, device_type: str) -> tuple[int, str]:
    batch, _reason = plan_real_batch("auto", n, c, d, IPC * AUGS * c, device_type)
    if batch is None:
        return n, "all rows"
    if batch >= n:   # over budget, but the authors' batch ipc*augs*C already covers the split: every row, shuffled
        return n, "all rows (as a batch of N)"
    return batch, f"{batch} sampled"


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


class Calibration:
    """Seconds per row of the whole-split gradient at one (C, D), from the largest measurement so far."""

    def __init__(self) -> None:
        self.measured: dict[int, dict[str, Any]] = {}

    def per_row(self) -> float | None:
        if not self.measured:
            return None
        rows = max(self.measured)
        return self.measured[rows]["median_s"] / rows


def run_dim(d: int, args: argparse.Namespace, work: Path, log) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (N, C) row of one feature dimension."""
    ns = sorted(args.n)
    n_disk = max(ns)
    mem_dtype = np.dtype(args.memory_dtype)
    torch_dtype = torch.float32 if args.memory_dtype == "float32" else torch.float16
    bytes_per_row_disk = d * 2 + 8
    free_disk = shutil.disk_usage(work).free
    info: dict[str, Any] = {"d": d}
    if n_disk * bytes_per_row_disk * 1.05 + 2**30 > free_disk:
        fit = int((free_disk - 2**30) / (bytes_per_row_disk * 1.05)) // CHUNK_ROWS * CHUNK_ROWS
        info["disk_note"] = (f"only {fmt_bytes(free_disk)} free in {work}: wrote {fit} of {n_disk} rows; "
                             f"larger N are extrapolated")
        log(info["disk_note"])
        n_disk = max(CHUNK_ROWS, fit)
    root = work / f"d{d}"
    written = write_split(root, n_disk, d, seed=d)
    info.update(written)
    log(f"D={d}: wrote {n_disk} rows fp16 ({fmt_bytes(written['bytes_on_disk'])} on disk) in {written['write_s']:.1f} s")

    # 1. the one-off load of each N (cold read, then freed)
    loads: dict[int, dict[str, Any]] = {}
    margin = args.memory_margin_gib * 2**30

    def memory_short(rows_needed: int) -> str | None:
        need = rows_needed * (d * mem_dtype.itemsize + 8)
        avail = _available_memory()
        if avail is not None and need + margin > avail:
            return f"needs {fmt_bytes(need)}, {fmt_bytes(avail)} available"
        return None

    for n in ns:
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
    measured_loads = [(n, r) for n, r in loads.items() if r["status"] == "measured"]

    # 2. the gradient: calibrate on a small prefix, then measure each N directly or a prefix of it
    rows: list[dict[str, Any]] = []
    probe_rows = min(ns[0], n_disk, 10_000)
    feats_np, labels_np = load_split(root, probe_rows, mem_dtype)   # warm-up / calibration set
    for c in args.c:
        cal = Calibration()
        # feats_np may already hold more rows (loaded for an earlier C): the probe uses the first probe_rows.
        cal.measured[probe_rows] = measure_grad(torch.from_numpy(feats_np[:probe_rows]).to(torch_dtype),
                                                torch.from_numpy(labels_np[:probe_rows]), c, 1, seed=c)
        # The largest prefix that fits the time limit, the rows on disk and the available memory.
        avail = _available_memory()
        held = feats_np.nbytes + labels_np.nbytes
        rows_mem = n_disk if avail is None else int((avail + held - margin) / (d * mem_dtype.itemsize + 8))
        rows_time = int(args.max_seconds / (cal.per_row() * (args.repeats + 1)))
        cap = min(rows_time, rows_mem, n_disk)
        targets = {n: n if n <= cap else max(probe_rows, cap // CHUNK_ROWS * CHUNK_ROWS) for n in ns}
        for size in sorted(set(targets.values())):
            if size in cal.measured and cal.measured[size]["calls"] >= args.repeats:
                continue
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
        for n in ns:
            m = cal.measured[targets[n]]
            exact = targets[n] == n
            seconds = m["median_s"] * n / targets[n]
            load = loads[n]
            load_bulk_s = None
            if load["status"] == "measured":
                load_s, load_bulk_s, load_how = load["load_s"], load["load_bulk_s"], "measured"
            elif measured_loads:
                ln, lr = max(measured_loads)
                load_s, load_how = lr["load_s"] * n / ln, f"extrapolated from {ln} rows ({load['status']})"
                load_bulk_s = lr["load_bulk_s"] * n / ln
            else:
                load_s, load_how = None, load["status"]
            cpu_rows, cpu_choice = plan(n, c, d, "cpu")
            gpu_rows, gpu_choice = plan(n, c, d, "cuda")
            rows.append({
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
            })
    del feats_np, labels_np
    shutil.rmtree(root, ignore_errors=True)
    return rows, info


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - without psutil, no check
        return None


def whole_run(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """ImageNet-1k (N = 1.28M, C = 1000, D = 768), 5000 steps: the real side of each mode."""
    r = IMAGENET_RUN
    # The row at exactly these sizes when it was run; else scale the closest measured (C, D) rate.
    cands = [x for x in rows if x["c"] == r["c"] and x["d"] == r["d"]]
    if not cands:
        return None
    ref = max(cands, key=lambda x: x["n"])
    cpu_full = ref["cpu_s_per_step"] * r["n"] / ref["n"]
    how = ref["cpu_how"] if ref["n"] == r["n"] else f"scaled from N={ref['n']} ({ref['cpu_how']})"
    steps = r["steps"]
    cpu_rows, _ = plan(r["n"], r["c"], r["d"], "cpu")
    gpu_rows, _ = plan(r["n"], r["c"], r["d"], "cuda")
    authors_batch = IPC * AUGS * r["c"]
    e2e_flops = authors_batch * VIT_B14_GFLOPS_224 * 1e9
    full_flops = 2 * macs_per_step(r["n"], r["c"], r["d"])
    modes = []

    def add(mode: str, rows_per_step: int, cpu_s: float, cpu_how: str, gpu_fp32: float | None, gpu_tf32: float | None,
            flops: float, note: str) -> None:
        modes.append({"mode": mode, "real_rows_per_step": rows_per_step, "tflop_per_step": flops / 1e12,
                      "cpu_s_per_step": cpu_s, "cpu_how": cpu_how, "cpu_run": fmt_s(cpu_s * steps),
                      "gpu_s_per_step": gpu_fp32, "gpu_tf32_s_per_step": gpu_tf32,
                      "gpu_run": None if gpu_fp32 is None else fmt_s(gpu_fp32 * steps),
                      "gpu_tf32_run": None if gpu_tf32 is None else fmt_s(gpu_tf32 * steps), "note": note})

    add("store, --real-batch full (whole split, exact)", r["n"], cpu_full, how,
        gpu_seconds(r["n"], r["c"], r["d"], GPU_ASSUMPTIONS["fp32_tflops"]),
        gpu_seconds(r["n"], r["c"], r["d"], GPU_ASSUMPTIONS["tf32_tflops"]), full_flops,
        "features loaded once (one-off load not included)")
    add(f"store, --real-batch auto on a CPU ({cpu_rows} rows)", cpu_rows, cpu_full * cpu_rows / r["n"],
        "from the same per-row rate", None, None, full_flops * cpu_rows / r["n"], "sampled, as the authors' batch")
    add(f"store, --real-batch auto on a GPU ({'all rows' if gpu_rows == r['n'] else gpu_rows})", gpu_rows,
        cpu_full * gpu_rows / r["n"], "from the same per-row rate",
        gpu_seconds(gpu_rows, r["c"], r["d"], GPU_ASSUMPTIONS["fp32_tflops"]),
        gpu_seconds(gpu_rows, r["c"], r["d"], GPU_ASSUMPTIONS["tf32_tflops"]), full_flops * gpu_rows / r["n"],
        "auto picks the whole split on a GPU at this size" if gpu_rows == r["n"] else "sampled")
    cpu_rate = ref["cpu_gflops"] * 1e9   # this CPU's measured GEMM rate: an optimistic ViT rate on it
    gpu_e2e = e2e_flops / (GPU_ASSUMPTIONS["bf16_tflops_vit"] * 1e12)
    add(f"end to end, the authors ({authors_batch} real images through ViT-B/14 per step)", authors_batch,
        e2e_flops / cpu_rate, f"FLOPs at this CPU's measured GEMM rate ({ref['cpu_gflops']:.0f} GFLOP/s, optimistic)",
        gpu_e2e, None, e2e_flops, "forward compute only: image decoding, augmentation and loading NOT included")
    return {"sizes": r, "modes": modes, "vit_b14_gflops_assumed": VIT_B14_GFLOPS_224}


def markdown(rows: list[dict[str, Any]], run: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    table = []
    for r in rows:
        table.append({
            "N": r["n"], "C": r["c"], "D": r["d"], "GFLOP/step": round(r["gflop_per_step"], 1),
            "CPU s/step": f"{r['cpu_s_per_step']:.3g}", "how": r["cpu_how"],
            "CPU GFLOP/s": round(r["cpu_gflops"], 1),
            "grad peak extra": fmt_bytes(r["grad_peak_extra_bytes"]),
            "on disk (fp16)": fmt_bytes(r["bytes_on_disk"]), f"in memory ({meta['memory_dtype']})":
                fmt_bytes(r["bytes_in_memory"]),
            "load (one-off)": "n/a" if r["load_s"] is None else f"{r['load_s']:.3g} s" +
            ("" if r["load_how"] == "measured" else " (extrap.)"),
            f"load, {BULK_CHUNKS} chunks/read": "n/a" if r["load_bulk_s"] is None else f"{r['load_bulk_s']:.3g} s",
            "auto on CPU": r["auto_cpu"], "auto on GPU": r["auto_gpu"],
            "GPU est. fp32": fmt_s(r["gpu_fp32_s_per_step"]), "GPU est. TF32": fmt_s(r["gpu_tf32_s_per_step"]),
        })
    a = GPU_ASSUMPTIONS
    text = [
        f"Whole-split real gradient (`linear_ce_grad` over all N rows, random head W ~ N(0, 0.01^2), b = 0, random "
        f"labels). Features: random fp16 in a chunked Zarr v3 array on disk ({CHUNK_ROWS}-row chunks, no codec), "
        f"read back chunk by chunk into {meta['memory_dtype']} memory once (the `load` column, one chunk per read as "
        f"`StoreSplit.load` does; the next column reads {BULK_CHUNKS} chunks per read; both after dropping the files' "
        f"page cache{'' if meta['cold_reads'] else ' — the drop failed here: warm reads'}); "
        f"the gradient step then reuses them. CPU s/step: median of {meta['repeats']} calls after one warm call; "
        f"'extrapolated from n rows' = measured on the first n rows, scaled linearly in N (calls longer than "
        f"{meta['max_seconds']} s were not run). Peak extra memory: {meta['memory_method']}. "
        f"Torch threads {meta['torch_threads']}; 1-min load average before the run {meta['load_average_start']}, "
        f"up to {meta['load_average_max_during']} during it (this run's own {meta['torch_threads']} threads count in "
        f"it){meta['busy_note']}.",
        "",
        f"GPU columns are NOT measured: roofline estimates `max(FLOPs / rate, bytes / bandwidth)` at ASSUMED rates "
        f"for one {a['gpu']}: IEEE fp32 GEMM {a['fp32_tflops']:.0f} TFLOP/s sustained (what the engine gets by "
        f"default: torch's fp32 matmul precision is IEEE unless the user enables TF32), TF32 {a['tf32_tflops']:.0f} "
        f"TFLOP/s sustained (conservative; ~400-495 is the dense peak), HBM {a['hbm_tb_s']:.0f} TB/s. Traffic model: "
        f"{a['traffic_model']}. `auto`: `engine.real.plan_real_batch('auto', N, C, D, ipc*augs*C, device)` with "
        f"ipc = {IPC}, augs = {AUGS}; budgets {REAL_MACS_BUDGET['cpu']:.3g} (cpu) and {REAL_MACS_BUDGET['cuda']:.3g} "
        f"(cuda) multiply-adds.",
        "",
        markdown_table(table),
    ]
    if run:
        s = run["sizes"]
        text += [f"## ImageNet-1k, whole run: real side only (N = {s['n']}, C = {s['c']}, D = {s['d']}, "
                 f"{s['steps']} steps)\n",
                 markdown_table([{
                     "mode": m["mode"], "rows/step": m["real_rows_per_step"],
                     "TFLOP/step": f"{m['tflop_per_step']:.3g}",
                     "this CPU s/step": f"{m['cpu_s_per_step']:.3g}", f"CPU run ({s['steps']} steps)": m["cpu_run"],
                     "GPU s/step est. (IEEE fp32; ViT: bf16)": "n/a" if m["gpu_s_per_step"] is None
                     else fmt_s(m["gpu_s_per_step"]),
                     "GPU s/step est. (TF32)": "n/a" if m["gpu_tf32_s_per_step"] is None
                     else fmt_s(m["gpu_tf32_s_per_step"]),
                     "GPU run est.": "n/a" if m["gpu_run"] is None else
                     m["gpu_run"] + ("" if m["gpu_tf32_run"] is None else f" fp32 / {m['gpu_tf32_run']} TF32"),
                     "note": m["note"]} for m in run["modes"]]),
                 f"End-to-end cost assumes {run['vit_b14_gflops_assumed']} GFLOPs per ViT-B/14 forward at 224 px "
                 f"(a stated assumption: 257 tokens at patch 14, and if the figure counts multiply-adds, as fvcore's "
                 f"do, the true FLOPs are up to ~2x higher, so this side is underestimated) at an assumed "
                 f"{a['bf16_tflops_vit']:.0f} TFLOP/s bf16 on the GPU. The authors call real-image loading their "
                 f"bottleneck: it is NOT included (no number for it is assumed), so end-to-end figures are lower "
                 f"bounds.\n"]
    text += ["## Conclusions\n", *meta["conclusions"]]
    return "\n".join(text) + "\n"


def conclusions(rows: list[dict[str, Any]], run: dict[str, Any] | None) -> list[str]:
    out = []
    if run:
        full, cpu_auto, gpu_auto, e2e = run["modes"]
        s = run["sizes"]
        out.append(
            f"- Exact (whole-split) gradients on ImageNet-1k (N = {s['n']}, C = {s['c']}, D = {s['d']}, "
            f"{full['tflop_per_step']:.2f} TFLOP per step) cost **{fmt_s(full['cpu_s_per_step'])} per step on this "
            f"CPU** ({full['cpu_how']}) and an estimated **~{fmt_s(full['gpu_tf32_s_per_step'])} (TF32) to "
            f"~{fmt_s(full['gpu_s_per_step'])} (IEEE fp32, the engine's default) per step on one H100/H200** "
            f"(assumed rates, not measured): milliseconds on a GPU, minutes on this CPU.")
        out.append(
            f"- A 5000-step run's real side: store mode with the whole split {full['gpu_tf32_run']} (TF32) to "
            f"{full['gpu_run']} (fp32) of GPU time; `--real-batch auto` on a GPU chooses "
            f"{'the whole split' if gpu_auto['real_rows_per_step'] == s['n'] else str(gpu_auto['real_rows_per_step']) + ' rows'} "
            f"at this size; on a CPU it samples {cpu_auto['real_rows_per_step']} rows ({fmt_s(cpu_auto['cpu_s_per_step'])} "
            f"per step, {cpu_auto['cpu_run']} per run here). End to end (the authors), the real forward alone is "
            f"{e2e['tflop_per_step']:.0f} TFLOP per step, {e2e['tflop_per_step'] / full['tflop_per_step']:.0f}x the "
            f"whole-split gradient: ~{e2e['gpu_run']} of GPU compute per run at the assumed rate, before any image "
            f"decoding or loading (not included).")
    big = [r for r in rows if r["n"] == max(x["n"] for x in rows)]
    if big:
        worst = max(big, key=lambda r: r["bytes_in_memory"])
        out.append(
            f"- Memory: the features dominate ({fmt_bytes(worst['bytes_in_memory'])} in memory at N = {worst['n']}, "
            f"D = {worst['d']}; {fmt_bytes(worst['bytes_on_disk'])} on disk as fp16); the gradient call itself adds "
            f"at most {fmt_bytes(max((r['grad_peak_extra_bytes'] or 0) for r in rows))} above its inputs at any size "
            f"here (row-blocked: it does not grow with N).")
    loads = [r for r in rows if r["load_how"] == "measured" and r["load_s"]]
    if loads:
        r = max(loads, key=lambda x: x["n"] * x["d"])
        out.append(f"- One-off load (Zarr store on disk -> memory, chunk by chunk as "
                   f"`StoreSplit.load` reads): {r['load_s']:.1f} s for N = {r['n']}, D = {r['d']} "
                   f"({fmt_bytes(r['bytes_on_disk'] / r['load_s'])}/s of fp16), paid once per run; reading "
                   f"{BULK_CHUNKS} chunks per call takes {r['load_bulk_s']:.1f} s "
                   f"({r['load_s'] / r['load_bulk_s']:.1f}x faster)" +
                   (": at this size the chunk-by-chunk load is dominated by Zarr's per-read overhead." if
                    r["load_s"] > 1.5 * r["load_bulk_s"] else
                    ": Zarr's per-read overhead is a small part at this size; the rest is reading and converting "
                    "the bytes (the page cache of the files was dropped first; cold and warm reads took about the "
                    "same time in a spot check on this machine's virtual disk)."))
    out.append("- Measured vs extrapolated: every CPU figure marked 'extrapolated' comes from a measured prefix of "
               "the same loaded split (linear in N); every GPU figure and every end-to-end figure is computed from "
               "stated assumptions, none was measured on a GPU.")
    return out


def busy_note(meta: dict[str, Any], cores: int) -> str:
    """Whether other work shared the CPU: the load before the run, or the load during it beyond our threads."""
    others = meta["load_average_max_during"] - meta["torch_threads"]
    if meta["load_average_start"] > 0.75 * cores or others > 0.5 * cores:
        return (f" — the machine is shared and other work was running (load before {meta['load_average_start']}, "
                f"up to ~{max(others, 0):.1f} beyond this run's threads): CPU times are pessimistic")
    return ""


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
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
    mmap_large_blocks()
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so the temp Zarr files are deleted.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)

    load_samples: list[float] = []   # 1-min load average at every log line (this run's threads included)

    def log(msg: str) -> None:
        load_samples.append(round(os.getloadavg()[0], 2))
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    log(f"bench_real_scale: {machine_line()}; load average {load_start}")
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
    run = whole_run(rows)
    load_end = round(os.getloadavg()[0], 2)
    cores = os.cpu_count() or 1
    meta = {"memory_dtype": args.memory_dtype, "repeats": args.repeats, "max_seconds": args.max_seconds,
            "torch_threads": torch.get_num_threads(), "load_average_start": load_start, "load_average_end": load_end,
            "load_average_max_during": max(load_samples + [load_end]),
            "cold_reads": all(r["load_cold"] for r in rows if r["load_how"] == "measured"),
            "memory_method": "peak RSS growth during the call (/proc/self/clear_refs + VmHWM, glibc mmap threshold "
                             "64 KiB), in this process",
            "chunk_rows": CHUNK_ROWS, "ipc": IPC, "augs": AUGS, "real_macs_budget": REAL_MACS_BUDGET,
            "gpu_assumptions": GPU_ASSUMPTIONS, "writes": infos, "wall_seconds": None}
    meta["busy_note"] = busy_note(meta, cores)
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    meta["conclusions"] = conclusions(rows, run)
    md = markdown(rows, run, meta)
    json_path, md_path = write_results(args.name, {"meta": meta, "rows": rows, "imagenet_run": run}, md, args.out_dir)
    print(md)
    log(f"wrote {json_path} and {md_path} ({meta['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
