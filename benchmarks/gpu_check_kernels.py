"""gpu_check's kernel parts: kernel-tests (the kernel tests through the Triton interpreter), kernel-cuda
(`linear_ce_grad` on CUDA tensors against float64 autograd) and bench-kernel (bench_kernel at ImageNet-1k
sizes, the fused op with TF32 GEMMs)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from benchmarks.gpu_check_context import Context, one_line, tail_reason
from benchmarks.harness import run_child


def part_kernel_tests(ctx: Context) -> dict[str, Any]:
    done = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/engine/test_kernels.py"])
    summary = next((line for line in reversed(done.stdout.splitlines()) if " in " in line and
                    ("passed" in line or "failed" in line or "error" in line)), "")
    out = {"summary": one_line(summary.strip("= ")),
           "note": "tests/engine/test_kernels.py runs the Triton kernels on CPU tensors (TRITON_INTERPRET=1); "
                   "the CUDA dispatch is checked by kernel-cuda"}
    if done.returncode != 0:
        return {"status": "failed", "reason": one_line(f"pytest exit {done.returncode}: {summary or tail_reason(done)}"),
                **out}
    return {"status": "passed", **out}


def _kernel_inputs(n: int, c: int, d: int, device: str, dtype, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=gen)
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64) * 0.05   # logits of order 1
    bias = torch.randn(c, generator=gen, dtype=torch.float64) * 0.1
    return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
            for t in (features, labels, weight, bias)]


def _relerr(actual, expected) -> float:
    import torch

    if not torch.isfinite(actual).all():
        return float("inf")
    scale = max(expected.abs().max().item(), 1e-12)
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item() / scale


def part_kernel_cuda(ctx: Context) -> dict[str, Any]:
    import torch

    from engine.kernels import ops

    device = ctx.device
    if device == "cuda" and not ops._HAS_TRITON:
        return {"status": "failed", "reason": "triton is not installed: the CUDA op falls back to blocked torch"}
    # (n, c, d, block_rows): odd sizes; several blocks with a ragged last one; C above one column tile (2048).
    shapes = [(1, 3, 5, 0), (777, 129, 65, 0), (300, 7, 33, 64), (1000, 10, 384, 0), (4099, 1000, 768, 1000),
              (2500, 2051, 96, 0), (70_001, 100, 768, 0)]
    if ctx.dry:
        shapes = [(1, 3, 5, 0), (777, 129, 65, 0), (300, 7, 33, 64), (2100, 2051, 24, 500)]
    # (name, input dtype, TF32 GEMMs, tolerance on the forward, tolerance on the backward), relative to max |ref|.
    modes = [("fp32", torch.float32, False, 1e-4, 1e-4), ("fp32+tf32", torch.float32, True, 1e-2, 2e-2),
             ("bf16", torch.bfloat16, False, 1e-4, 2e-2)]
    cases, failures = [], []
    previous = torch.get_float32_matmul_precision()
    try:
        for n, c, d, block_rows in shapes:
            for mode in modes:
                case, failure = _kernel_case(ctx, n, c, d, block_rows, *mode)
                cases.append(case)
                if failure is not None:
                    failures.append(failure)
    finally:
        torch.set_float32_matmul_precision(previous)
    triton_used = "engine.kernels.triton_linear_ce" in sys.modules
    out = {"cases": cases, "triton_path_used": triton_used, "device": device}
    if device == "cuda" and not triton_used:
        failures.append("the CUDA calls did not reach the Triton kernels (engine.kernels.triton_linear_ce never "
                        "imported)")
    if failures:
        return {"status": "failed", "reason": one_line(f"{len(failures)} case(s) out of tolerance; first: {failures[0]}"),
                **out}
    return {"status": "passed", **out}


def _kernel_case(ctx: Context, n: int, c: int, d: int, block_rows: int, name: str, dtype, tf32: bool,
                 tol_fwd: float, tol_bwd: float) -> tuple[dict[str, Any], str | None]:
    """One shape in one mode: the op's gradients w.r.t. (W, b) and, through its backward, w.r.t. the features,
    against float64 references on the same (already rounded) values; the case and its failure, if any."""
    import torch
    import torch.nn.functional as F

    from engine.kernels import linear_ce_grad

    device = ctx.device
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    features, labels, weight, bias = _kernel_inputs(n, c, d, device, dtype, seed=n + c + d)
    # float64 references on the same (already rounded) values.
    z64, w64, b64 = (t.detach().double().cpu() for t in (features, weight, bias))
    y = labels.cpu()
    w_ref = w64.clone().requires_grad_(True)
    b_ref = b64.clone().requires_grad_(True)
    ref_w, ref_b = torch.autograd.grad(F.cross_entropy(z64 @ w_ref.t() + b_ref, y), (w_ref, b_ref))
    feats = features.detach().clone().requires_grad_(True)
    grad_w, grad_b = linear_ce_grad(feats, labels, weight, bias, block_rows=block_rows)
    gen = torch.Generator().manual_seed(1)
    up_w = torch.randn(c, d, generator=gen, dtype=torch.float64)
    up_b = torch.randn(c, generator=gen, dtype=torch.float64)
    (grad_z,) = torch.autograd.grad((grad_w * up_w.to(device, grad_w.dtype)).sum()
                                    + (grad_b * up_b.to(device, grad_b.dtype)).sum(), feats)
    z_ref = z64.clone().requires_grad_(True)
    probs = torch.softmax(z_ref @ w64.t() + b64, dim=1)
    a = probs - F.one_hot(y, c).double()
    (ref_z,) = torch.autograd.grad(((a.t() @ z_ref / n) * up_w).sum() + (a.mean(0) * up_b).sum(), z_ref)
    ctx.sync()
    errs = {"grad_weight": _relerr(grad_w, ref_w), "grad_bias": _relerr(grad_b, ref_b),
            "grad_features": _relerr(grad_z, ref_z)}
    ok = (grad_w.dtype == torch.float32 and grad_z.dtype == dtype and grad_z.device.type == device
          and errs["grad_weight"] <= tol_fwd and errs["grad_bias"] <= tol_fwd
          and errs["grad_features"] <= tol_bwd)
    case = {"n": n, "c": c, "d": d, "block_rows": block_rows, "mode": name,
            **{k: float(f"{v:.3g}") for k, v in errs.items()}, "tol_fwd": tol_fwd, "tol_bwd": tol_bwd,
            "ok": ok}
    if ok:
        return case, None
    return case, (f"{name} N={n} C={c} D={d}: errors {errs} (tolerances {tol_fwd}/{tol_bwd}, "
                  f"dtypes {grad_w.dtype}/{grad_z.dtype})")


def part_bench_kernel(ctx: Context) -> dict[str, Any]:
    import torch

    out_dir = ctx.work / "bench_kernel"
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.dry:
        sizes = ["--n", "4096", "--c", "10", "--d", "32", "--repeats", "1"]
    else:
        sizes = ["--n", "262144", "1281167", "--c", "1000", "--d", "768", "--repeats", "5"]
    done = run_child([sys.executable, "-m", "benchmarks.bench_kernel", *sizes, "--device", ctx.device,
                      "--out-dir", str(out_dir), "--name", "bench_kernel_check", "--quiet"])
    if done.returncode != 0:
        return {"status": "failed", "reason": "bench_kernel: " + tail_reason(done)}
    rows = json.loads((out_dir / "bench_kernel_check.json").read_text())["rows"]
    keep = ("method", "n", "c", "d", "median_ms", "peak_extra_mib", "speedup_vs_naive")
    rows = [{k: r.get(k) for k in keep} for r in rows]
    # The fused op at the largest N with TF32 GEMMs (the engine's default is IEEE fp32).
    from benchmarks.bench_kernel import make_inputs

    n, c, d = (4096, 10, 32) if ctx.dry else (1281167, 1000, 768)
    from engine.kernels import linear_ce_grad

    inputs = make_inputs(n, c, d, torch.float32, torch.device(ctx.device))
    tf32 = {}
    previous = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            linear_ce_grad(*inputs)
            times = []
            for _ in range(1 if ctx.dry else 5):
                ctx.sync()
                start = time.perf_counter()
                linear_ce_grad(*inputs)
                ctx.sync()
                times.append(time.perf_counter() - start)
            tf32["ieee_fp32_ms" if precision == "highest" else "tf32_ms"] = statistics.median(times) * 1e3
    finally:
        torch.set_float32_matmul_precision(previous)
    flops = 4 * n * c * d
    headline = {"n": n, "c": c, "d": d, **{k: round(v, 3) for k, v in tf32.items()},
                "ieee_fp32_tflops": flops / tf32["ieee_fp32_ms"] / 1e9, "tf32_tflops": flops / tf32["tf32_ms"] / 1e9}
    return {"status": "passed", "rows": rows, "whole_split_fused": headline}
