"""What bench_real_scale computes, not measures: multiply-adds per step, what `--real-batch auto` chooses,
a datacenter-GPU estimate of the whole-split step at ASSUMED rates, and the whole-run real-side cost of
ImageNet-1k (5000 steps) in store mode vs the authors' end-to-end mode."""

from __future__ import annotations

from typing import Any

from benchmarks.common import fmt_s
from engine.real import plan_real_batch

IMAGENET_TRAIN_ROWS = 1_281_167
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


def plan(n: int, c: int, d: int, device_type: str) -> tuple[int, str]:
    batch, _reason = plan_real_batch("auto", n, c, d, IPC * AUGS * c, device_type)
    if batch is None:
        return n, "all rows"
    if batch >= n:   # over budget, but the authors' batch ipc*augs*C already covers the split: every row, shuffled
        return n, "all rows (as a batch of N)"
    return batch, f"{batch} sampled"


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
