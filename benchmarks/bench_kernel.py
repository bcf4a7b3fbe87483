"""Benchmark: the real-gradient op vs the naive torch expressions.

Methods (all give (grad_weight [C, D], grad_bias [C]) of the mean CE of a linear head):
  dispatch  engine.kernels.linear_ce_grad, what the engine calls: the plain expression when the N x C
            matrix fits one row block, else the blocked op
  blocked   the blocked op itself (probe_distill::linear_ce_grad; Triton row kernels on CUDA)
  naive     softmax over the full N x C logits, minus one-hot, then one matmul
  autograd  F.cross_entropy + torch.autograd.grad w.r.t. (W, b): what the authors' code does

Reports the median time per call and the peak extra memory of one call. On CPU every
(size, method) runs in a fresh subprocess; glibc is told to mmap every block of 64 KiB or more (so
freed memory goes back to the OS and the resident set tracks live memory), the kernel's peak-RSS
mark is reset after the inputs are built and the libraries warmed up on a tiny problem, and memory
is the peak RSS during one call minus the RSS before it (Linux /proc/self/clear_refs; ru_maxrss
growth where that is unavailable). On CUDA it runs in-process: torch.cuda.max_memory_allocated above
the inputs.

    python -m benchmarks.bench_kernel                       # default sizes, < 3 min on 2 CPU cores
    python -m benchmarks.bench_kernel --n 262144 1281167 --c 1000 --d 768 1024 --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, markdown_table, write_results
from benchmarks.harness import PeakExtraMemory, mmap_large_blocks, run_child
from engine.kernels import linear_ce_grad, linear_ce_grad_op

METHODS = ("dispatch", "blocked", "naive", "autograd")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def naive_grad(features, labels, weight, bias):
    probs = torch.softmax(features.float() @ weight.float().t() + bias.float(), dim=1)   # N x C
    probs[torch.arange(features.shape[0], device=features.device), labels] -= 1
    n = features.shape[0]
    return probs.t() @ features.float() / n, probs.sum(0) / n


def autograd_grad(features, labels, weight, bias):
    w = weight.detach().float().requires_grad_(True)
    b = bias.detach().float().requires_grad_(True)
    loss = F.cross_entropy(features.float() @ w.t() + b, labels)
    return torch.autograd.grad(loss, (w, b))


def method_fn(name: str) -> Callable:
    return {"dispatch": linear_ce_grad, "blocked": linear_ce_grad_op, "naive": naive_grad,
            "autograd": autograd_grad}[name]


def make_inputs(n: int, c: int, d: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(n, d, generator=gen, device=device).to(dtype)
    labels = torch.randint(0, c, (n,), generator=gen, device=device)
    weight = (torch.randn(c, d, generator=gen, device=device) * 0.01).to(dtype)  # LGM's random head
    bias = torch.zeros(c, device=device, dtype=dtype)
    return features, labels, weight, bias


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, n: int, c: int, d: int, dtype: torch.dtype, device: torch.device,
            repeats: int) -> dict[str, Any]:
    """Time and peak extra memory of one method on one size (call in a fresh process on CPU)."""
    fn = method_fn(method)
    fn(*make_inputs(64, min(c, 16), 16, dtype, device))          # load libraries, thread pools, kernels
    inputs = make_inputs(n, c, d, dtype, device)
    _sync(device)
    with PeakExtraMemory(device) as memory:
        out = fn(*inputs)
        _sync(device)
    del out
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn(*inputs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"method": method, "n": n, "c": c, "d": d, "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3, "peak_extra_mib": memory.extra_bytes / 2**20, "repeats": repeats}


def _measure_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    done = run_child([sys.executable, "-m", "benchmarks.bench_kernel", "--worker", json.dumps(spec)])
    if not done.ok:
        raise RuntimeError(f"benchmark worker failed for {spec} ({done.reason()}):\n{done.stderr[-2000:]}")
    return done.last_json()


def run(ns: list[int], cs: list[int], ds: list[int], methods: list[str], dtype_name: str, device: torch.device,
        repeats: int, out_dir: Path, quiet: bool = False) -> list[dict[str, Any]]:
    rows = []
    for n in ns:
        for c in cs:
            for d in ds:
                by_method = {}
                for method in methods:
                    spec = dict(method=method, n=n, c=c, d=d, dtype=dtype_name, device=str(device), repeats=repeats)
                    if device.type == "cpu":
                        row = _measure_in_subprocess(spec)
                    else:
                        row = measure(method, n, c, d, _DTYPES[dtype_name], device, repeats)
                        torch.cuda.empty_cache()
                    row["probs_mib"] = n * c * 4 / 2**20   # what the full N x C fp32 matrix alone costs
                    by_method[method] = row
                    rows.append(row)
                    if not quiet:
                        print(f"N={n:>8} C={c:>5} D={d:>5} {method:>8}: {row['median_ms']:9.2f} ms  "
                              f"peak +{row['peak_extra_mib']:8.1f} MiB", file=sys.stderr, flush=True)
                if "naive" in by_method:
                    for row in by_method.values():
                        row["speedup_vs_naive"] = by_method["naive"]["median_ms"] / row["median_ms"]
    return rows


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    text = (f"Device: {meta['device']}, dtype {meta['dtype']}, torch threads {meta['torch_threads']}, "
            f"median of {meta['repeats']} calls after one measured first call. `peak_extra_mib`: peak memory "
            f"above the inputs during one call ({meta['memory_method']}); `probs_mib`: size of the full N x C "
            "fp32 probability matrix that the naive expressions materialize. CPU figures on a shared machine "
            f"are noisy (load average at start: {meta['load_average']}).\n\n")
    columns = ["n", "c", "d", "method", "median_ms", "speedup_vs_naive", "peak_extra_mib", "probs_mib"]
    return text + markdown_table(rows, columns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 32768], help="rows (real features)")
    parser.add_argument("--c", type=int, nargs="+", default=[10, 100, 1000], help="classes")
    parser.add_argument("--d", type=int, nargs="+", default=[384], help="feature dimension")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="input dtype")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per size (median reported)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="bench_kernel", help="results file stem")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)   # internal: one measurement, JSON on stdout
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        if spec["device"] == "cpu":
            mmap_large_blocks()
        print(json.dumps(measure(spec["method"], spec["n"], spec["c"], spec["d"], _DTYPES[spec["dtype"]],
                                 torch.device(spec["device"]), spec["repeats"])))
        return

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda asked for, but no CUDA device is visible")
    meta = {"device": str(device), "dtype": args.dtype, "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "triton": importlib.import_module("triton").__version__ if importlib.util.find_spec("triton") else None,
            "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "peak RSS growth, fresh process per measurement"}
    started = time.perf_counter()
    rows = run(args.n, args.c, args.d, args.methods, args.dtype, device, args.repeats, args.out_dir, args.quiet)
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    speedups = [r["speedup_vs_naive"] for r in rows if r["method"] == "dispatch" and "speedup_vs_naive" in r]
    summary = {"min_speedup_vs_naive": min(speedups) if speedups else None,
               "note": "dispatch = engine.kernels.linear_ce_grad; >= 1.0 means never slower than the naive "
                       "expression; differences of a few % are within this machine's timing noise"}
    text = _markdown(rows, meta) + (f"\n**Summary**: dispatch vs naive, minimum over the sizes above: "
                                    f"{summary['min_speedup_vs_naive']:.3g}x ({summary['note']}).\n" if speedups else "")
    json_path, md_path = write_results(args.name, {"meta": meta, "summary": summary, "rows": rows}, text, args.out_dir)
    print(f"wrote {json_path} and {md_path} ({meta['wall_seconds']} s)")


if __name__ == "__main__":
    main()
