"""One-command GPU check (`make gpu-check`): what a CUDA machine must show before anyone trusts the GPU paths.

Parts, each in its own process with its own timeout (a failure or a hang in one does not stop the others),
the whole under ~8 minutes on one datacenter GPU:

  kernel-tests   pytest tests/engine/test_kernels.py. That file runs the Triton kernels on CPU tensors through the
                 Triton interpreter, so it proves the kernels' logic, not the CUDA dispatch; hence:
  kernel-cuda    `linear_ce_grad` on CUDA tensors (fp32 with IEEE and with TF32 GEMMs, bf16 inputs) against
                 autograd of F.cross_entropy w.r.t. (W, b) in float64, and its backward w.r.t. the features
                 against autograd of the naive expression in float64; shapes include non-multiples of the
                 block sizes, several row blocks with a ragged last one, and C above one Triton column tile
  bench-kernel   benchmarks.bench_kernel at ImageNet-1k sizes (N = 262144 and 1281167, C = 1000, D = 768:
                 fused / naive / autograd), plus the fused op at N = 1281167 with TF32 GEMMs
  distill-steps  LGM steps with a random-weight DINOv2 ViT-B/14 at 224 px (timm, pretrained=False), C = 100,
                 ipc = 1, augs = 10, bf16 autocast: store mode (10k random stored fp16 features,
                 --real-batch auto) vs end-to-end mode (the authors' ipc*augs*C real images augmented and
                 pushed through the backbone every step; images decoded once and cached, so decoding is
                 not in the step time): seconds per step and torch.cuda.max_memory_allocated
  build          `fs build` throughput vs the bare backbone forward, both on the GPU (JPEG files from
                 benchmarks.bench_build's generator; bench_build itself has no device flag and runs its
                 bare forward on the CPU)
  torchrun       `fs build gratings --backbone test-cnn` then
                 `torchrun --standalone --nproc-per-node P -m cli.engine distill ... --steps 7 --augs 2`
                 for P = 1 (and P = 2 when there are two GPUs): exit 0, 7 steps in metrics.jsonl, config.json's
                 device, and its "distributed" entry (backend nccl) when P > 1 (with P = 1 the engine creates
                 no process group at all, by design); plus, per P, a torchrun NCCL collective smoke test (a
                 process group initialized by hand, the engine's all_gather_rows / reduce_step on CUDA
                 tensors), which exercises NCCL even on a single GPU. --dry-run-cpu: P = 1 and 2 with gloo

Results: benchmarks/results/gpu_check.{json,md}, per part passed / failed (one-line reason) / skipped, with
timings. Exit 0 when no part failed, 1 otherwise; without CUDA it prints one line and exits 2.

    make gpu-check                                   # = python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --parts kernel-cuda bench-kernel
    python -m benchmarks.gpu_check --dry-run-cpu     # the same code paths on the CPU at tiny sizes (plumbing
                                                     # only; results go to a temp dir unless --out-dir)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from benchmarks.harness import ChildRun, run_child

TOTAL_BUDGET_S = 470          # the whole check must end within 8 minutes
# name -> (timeout in seconds on a GPU, what it checks)
PARTS: dict[str, tuple[int, str]] = {
    "kernel-tests": (110, "pytest tests/engine/test_kernels.py (Triton kernels via the interpreter, CPU path)"),
    "kernel-cuda": (60, "linear_ce_grad on CUDA tensors vs float64 autograd (fp32, TF32, bf16; backward)"),
    "bench-kernel": (60, "bench_kernel at N = 262144 / 1281167, C = 1000, D = 768 (+ fused with TF32)"),
    "distill-steps": (110, "LGM steps, random ViT-B/14 at 224 px, C = 100, ipc 1, augs 10: store vs end to end"),
    "build": (60, "fs build throughput vs bare forward, both on the device"),
    "torchrun": (70, "torchrun distill on a tiny store + NCCL collective smoke test"),
}


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Context:
    def __init__(self, dry: bool, work: Path) -> None:
        self.dry = dry
        self.work = work
        self.device = "cpu" if dry else "cuda"

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


def tail_reason(done: ChildRun) -> str:
    return one_line(done.reason())


# ------------------------------------------------------------------------------------------------ parts

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
    import torch.nn.functional as F

    from engine.kernels import linear_ce_grad, ops

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
            for name, dtype, tf32, tol_fwd, tol_bwd in modes:
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
                cases.append(case)
                if not ok:
                    failures.append(f"{name} N={n} C={c} D={d}: errors {errs} (tolerances {tol_fwd}/{tol_bwd}, "
                                    f"dtypes {grad_w.dtype}/{grad_z.dtype})")
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


def _random_vit(size: int, device: str):
    """A random-weight DINOv2 ViT-B/14 wrapped as a `Backbone` (the registered one needs hub weights)."""
    import dataclasses

    import timm

    from featurestore.backbones import Backbone, get_spec

    spec = dataclasses.replace(get_spec("dinov2-vitb14"), name="dinov2-vitb14-random", aliases=(),
                               weights="random init (gpu_check)", hub_id=None)
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=0, img_size=size)
    resize = round(size * spec.resize_size / spec.image_size)
    return Backbone(spec, model, model, image_size=size, resize_size=resize, weights_path=None).to(device)


class _NoiseImages:
    """Deterministic random RGB images (a stand-in dataset: ImageRealSource only calls load_image)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def load_image(self, index: int):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(index)
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))


def _real_source(mode: str, backbone, c: int, n_store: int, authors_batch: int, device: str):
    """The real side of `distill_mode` and the line saying what it takes per step."""
    import torch

    from engine.real import ImageRealSource, StoreRealSource, plan_real_batch

    if mode == "store":
        gen = torch.Generator().manual_seed(1)
        features = torch.randn(n_store, backbone.dim, generator=gen).half()   # as stored (fp16)
        labels = torch.randint(0, c, (n_store,), generator=gen)
        batch, real_batch_note = plan_real_batch("auto", n_store, c, backbone.dim, authors_batch,
                                                 torch.device(device).type)
        real = StoreRealSource(features, labels, batch=batch, device=device)
    else:
        # The authors' real batch: ipc * augs * C images, each augmented and pushed through the backbone every
        # step. Exactly that many rows, so every row is used every step and the decoded canonical images fit
        # the source's in-memory cache: decoding happens in the warm-up step only.
        rows = torch.arange(authors_batch)
        labels = rows % c
        real = ImageRealSource(_NoiseImages(backbone.resize_size), rows, labels, backbone, batch=authors_batch,
                               augment_images=True, cache_bytes=authors_batch * 3 * backbone.resize_size ** 2 * 4)
        real_batch_note = f"end to end: {authors_batch} real images augmented and embedded per step (decoded once, cached)"
    return real, real_batch_note


def distill_mode(mode: str, backbone, c: int, ipc: int, augs: int, n_store: int, warmup: int, steps: int,
                 ctx: Context) -> dict[str, Any]:
    """`steps` timed LGM steps (after `warmup`): engine.distill.loop.step, the step `engine distill` runs,
    then the optimizer update."""
    import math

    import torch

    from engine.distill.backprop import SyntheticSide, resolve_copies_per_pass
    from engine.distill.loop import step
    from engine.distill.members import Member
    from engine.distill.memory import peak_memory_mb, reset_peak_memory
    from engine.distill.run import stepping_run
    from engine.distill.seeds import make_generators
    from engine.objectives import get_objective
    from engine.parameterizations import make_synthetic
    from featurestore.augment import AugmentConfig
    from featurestore.distributed import destroy, init_process_group_from_env

    device = ctx.device
    if device == "cuda":
        torch.cuda.empty_cache()
        reset_peak_memory(torch.device(device))
    gens = make_generators(0)
    real, real_batch_note = _real_source(mode, backbone, c, n_store, ipc * augs * c, device)
    synthetic = make_synthetic("pyramid", c, ipc, backbone.resize_size, init="noise", grow_every=10_000,
                               generator=gens["init"], device=device)
    side = SyntheticSide(backbone, augs, True, AugmentConfig())
    copies = side.copies(synthetic.n)
    per_pass, pass_info = resolve_copies_per_pass("auto", side, synthetic.images().detach(), copies)
    member = Member(split=None, backbone=backbone, real=real, side=side, weight=1.0, copies_per_pass=per_pass,
                    pass_info=pass_info, real_batch_note=real_batch_note)
    dist_ctx = init_process_group_from_env(device)
    try:
        run = stepping_run(dist_ctx, [member], get_objective("lgm", c), synthetic, gens, lr=2e-3)
        times, losses = [], []
        for index in range(warmup + steps):
            ctx.sync()
            start = time.perf_counter()
            loss, _, _ = step(run, index, [False])
            run.optimizer.step()
            ctx.sync()
            if index >= warmup:
                times.append(time.perf_counter() - start)
            losses.append(loss)
    finally:
        destroy(dist_ctx)
    return {"mode": mode, "s_per_step": statistics.median(times), "steps_timed": len(times),
            "peak_memory_gib": round(peak_memory_mb(torch.device(device)) / 1024, 3),
            "peak_memory_how": "torch.cuda.max_memory_allocated" if device == "cuda" else "VmHWM of the part's process",
            "copies_per_step": copies, "copies_per_pass": per_pass, "chunk": pass_info.get("chunk"),
            "real_rows_per_step": real.num_rows if real.batch is None else min(real.batch, real.num_rows),
            "real_plan": real_batch_note,
            "losses_finite": all(math.isfinite(v) for v in losses), "last_loss": round(losses[-1], 5)}


def part_distill_steps(ctx: Context) -> dict[str, Any]:
    import torch

    if ctx.dry:
        size, c, ipc, augs, n_store, warmup, steps = 28, 4, 1, 2, 256, 1, 2
    else:
        size, c, ipc, augs, n_store, warmup, steps = 224, 100, 1, 10, 10_000, 1, 3
    torch.manual_seed(0)
    backbone = _random_vit(size, ctx.device)
    results = [distill_mode(mode, backbone, c, ipc, augs, n_store, warmup, steps, ctx) for mode in ("store", "end-to-end")]
    setup = {"backbone": "timm vit_base_patch14_dinov2 (random weights)", "image_size": size, "C": c, "ipc": ipc,
             "augs": augs, "store_rows": n_store, "precision": "bf16 autocast" if ctx.device == "cuda" else "fp32"}
    store, e2e = results
    out = {"setup": setup, "modes": results,
           "e2e_over_store_time": e2e["s_per_step"] / store["s_per_step"],
           "e2e_over_store_memory": e2e["peak_memory_gib"] / max(store["peak_memory_gib"], 1e-9)}
    bad = [r["mode"] for r in results if not r["losses_finite"]]
    if bad:
        return {"status": "failed", "reason": f"non-finite loss in mode(s) {', '.join(bad)}", **out}
    return {"status": "passed", **out}


def part_build(ctx: Context) -> dict[str, Any]:
    import shutil

    import torch

    from benchmarks.bench_build import write_jpeg_folder
    from featurestore.augment import center_crop
    from featurestore.backbones import create_backbone
    from featurestore.build import _default_workers, build
    from featurestore.datasets import canonical_image, open_dataset

    if ctx.dry:
        backbone_name, size, per_class, batch, repeats, workers = "efficientnet-lite0", 112, 4, 16, 1, 1
    else:
        backbone_name, size, per_class, batch, repeats, workers = "efficientnet-lite0", 224, 200, 256, 2, None
    workers = _default_workers() if workers is None else workers
    root = ctx.work / "jpeg"
    n, source = write_jpeg_folder(root, per_class, None)
    model = create_backbone(backbone_name, image_size=size, device=ctx.device)
    ds = open_dataset("imagefolder", root=root, split="train")
    canon = torch.stack([canonical_image(ds.load_image(i), model.resize_size) for i in range(len(ds))])
    if ctx.device == "cuda":
        canon = canon.pin_memory()

    def bare() -> float:
        ctx.sync()
        start = time.perf_counter()
        for lo in range(0, len(canon), batch):
            model.embed(center_crop(canon[lo:lo + batch], model.image_size)).to(torch.float16)
        ctx.sync()
        return len(canon) / (time.perf_counter() - start)

    def built() -> float:
        store = ctx.work / "bench-store"
        shutil.rmtree(store, ignore_errors=True)
        start = time.perf_counter()
        report = build("imagefolder", backbone_name, str(store / "fs"), data_root=str(root), image_size=size,
                       batch_size=batch, workers=workers, device=ctx.device, quiet=True)
        ctx.sync()
        rate = report.splits[0].rows / (time.perf_counter() - start)
        shutil.rmtree(store, ignore_errors=True)
        return rate

    bare()  # warm-up (cuDNN / oneDNN, allocator)
    bare_rates, build_rates = [], []
    for _ in range(repeats):
        bare_rates.append(bare())
        build_rates.append(built())
    rate, ceiling = max(build_rates), max(bare_rates)
    return {"status": "passed", "backbone": backbone_name, "image_size": size, "images": n, "source": source,
            "batch_size": batch, "workers": workers, "build_img_s": round(rate, 1), "bare_forward_img_s": round(ceiling, 1),
            "ratio": round(rate / ceiling, 3),
            "note": "bare = backbone.embed on pre-decoded canonical images (pinned host memory) on the same device; "
                    "build = a complete `fs build` (listing, JPEG decode in workers, forward, Zarr writes, "
                    "statistics, model loading and worker start-up included), best of the repeats"}


def part_torchrun(ctx: Context) -> dict[str, Any]:
    import torch

    from engine.distill.outdir import CONFIG_FILE, METRICS_FILE

    if ctx.device == "cuda":
        # One rank (the 1-GPU smoke run), and two ranks in one NCCL group when there are two GPUs.
        nprocs = [1, 2] if torch.cuda.device_count() >= 2 else [1]
        backend = "nccl"
    else:
        nprocs, backend = [1, 2], "gloo"
    store = ctx.work / "fs"
    done = run_child([sys.executable, "-m", "cli.fs", "build", "gratings", "--backbone", "test-cnn", "--limit-per-class",
                      "4", "--store", str(store), "--device", ctx.device, "--quiet"])
    if done.returncode != 0:
        return {"status": "failed", "reason": "fs build: " + tail_reason(done)}
    result: dict[str, Any] = {"nproc_per_node": nprocs, "distill": [], "collectives": []}
    problems = []
    for nproc in nprocs:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        out = ctx.work / f"out-{nproc}"
        done = run_child([*torchrun, "-m", "cli.engine", "distill", "--store", str(store), "--backbone", "test-cnn",
                          "--out", str(out), "--steps", "7", "--augs", "2", "--device", ctx.device, "--quiet"])
        if done.returncode != 0:
            problems.append(f"torchrun --nproc-per-node {nproc} distill " + tail_reason(done))
        else:
            config = json.loads((out / CONFIG_FILE).read_text())
            steps = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]
            record = {"nproc": nproc, "exit": 0, "device": config.get("device"), "amp": config.get("amp"),
                      "distributed": config.get("distributed"), "steps_recorded": len(steps)}
            if not str(config.get("device", "")).startswith(ctx.device):
                problems.append(f"nproc {nproc}: config.json device {config.get('device')!r}, expected {ctx.device}")
            if len(steps) != 7:
                problems.append(f"nproc {nproc}: metrics.jsonl has {len(steps)} steps, expected 7")
            if nproc > 1:
                got = (config.get("distributed") or {}).get("backend")
                if got != backend:
                    problems.append(f"nproc {nproc}: config.json distributed.backend {got!r}, expected {backend!r}")
                record["what_was_exercised"] = f"{nproc} ranks in one process group ({backend})"
            else:
                if config.get("distributed") is not None:
                    problems.append("nproc 1: config.json has a 'distributed' entry (the engine creates no group "
                                    "for world size 1)")
                record["what_was_exercised"] = (
                    "torchrun launch with WORLD_SIZE=1: the engine's single-process path on the device (no process "
                    "group, by design, so no 'distributed' entry in config.json); the collective smoke test below "
                    f"exercises {backend} itself")
            result["distill"].append(record)
        done = run_child([*torchrun, "-m", "benchmarks.gpu_check", "--collective-worker", ctx.device])
        if done.returncode != 0:
            problems.append(f"nproc {nproc}: {backend} collective smoke test " + tail_reason(done))
        else:
            result["collectives"] += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if problems:
        return {"status": "failed", "reason": one_line("; ".join(problems)), **result}
    return {"status": "passed", **result}


def collective_worker(device: str) -> int:
    """Under torchrun: a process group initialized by hand (NCCL on CUDA even with one rank), then the engine's
    all_gather_rows / reduce_step and featurestore's group reuse on it. Prints one JSON line per rank."""
    import torch
    import torch.distributed as dist

    from engine.distributed import all_gather_rows, reduce_step
    from featurestore.distributed import init_process_group_from_env

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        counts = [r + 2 for r in range(world)]
        piece = torch.full((counts[rank], 3), float(rank), device=dev)
        # all_gather_rows is an identity for world size 1 (engine design); call the collective directly as well.
        gathered = all_gather_rows(piece, counts)
        direct = [torch.empty(4, device=dev) for _ in range(world)]
        dist.all_gather(direct, torch.full((4,), float(rank + 1), device=dev))
        param = torch.zeros(5, device=dev, requires_grad=True)
        param.grad = torch.full((5,), float(rank + 1), device=dev)
        stop, nonfinite = reduce_step([param], False, False)
        total = torch.tensor([float(rank + 1)], device=dev)
        dist.all_reduce(total)
        ctx = init_process_group_from_env(device)    # must reuse the existing group, not create another
        expect_sum = world * (world + 1) / 2
        checks = {
            "backend": str(dist.get_backend()),
            "all_reduce_ok": abs(total.item() - expect_sum) < 1e-6,
            "all_gather_ok": all(abs(t[0].item() - (r + 1)) < 1e-6 for r, t in enumerate(direct)),
            "all_gather_rows_ok": gathered.shape[0] == sum(counts) if world > 1 else gathered is piece,
            "reduce_step_ok": (not stop and not nonfinite and
                               abs(param.grad[0].item() - (expect_sum if world > 1 else 1.0)) < 1e-6),
            "group_reused": not ctx.owns_group,
        }
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print(json.dumps({"rank": rank, "world_size": world, **checks}), flush=True)
    return 0 if all(v for k, v in checks.items() if k.endswith("_ok") or k == "group_reused") else 1


PART_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "kernel-tests": part_kernel_tests, "kernel-cuda": part_kernel_cuda, "bench-kernel": part_bench_kernel,
    "distill-steps": part_distill_steps, "build": part_build, "torchrun": part_torchrun,
}


def run_part_here(name: str, dry: bool, work: Path, result_path: Path) -> int:
    """Child side: run one part, write its result as JSON (a crash becomes 'failed' with a one-line reason)."""
    ctx = Context(dry, work)
    try:
        result = PART_FUNCTIONS[name](ctx)
    except Exception as exc:  # noqa: BLE001 - any failure of a part is reported, never propagated
        traceback.print_exc()
        result = {"status": "failed", "reason": one_line(f"{type(exc).__name__}: {exc}")}
    result_path.write_text(json.dumps(result, default=str))
    return 0


# ------------------------------------------------------------------------------------------------ driver

def run_part(name: str, timeout: float, dry: bool, work: Path) -> dict[str, Any]:
    """Parent side: the part in a fresh process (own session, killed as a group on timeout)."""
    part_work = work / name
    part_work.mkdir(parents=True, exist_ok=True)
    result_path = part_work / "result.json"
    log_path = part_work / "log.txt"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--part", name, "--work", str(part_work),
           "--result", str(result_path)] + (["--dry-run-cpu"] if dry else [])
    done = run_child(cmd, timeout=timeout, log=log_path)
    seconds = round(done.seconds, 1)
    if done.timed_out:
        result = {"status": "failed", "reason": done.reason()}
    elif result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        result = {"status": "failed", "reason": tail_reason(done)}
    out = {"part": name, "seconds": seconds, "timeout_s": round(timeout), **result}
    if out["status"] != "passed":
        out["log_tail"] = log_path.read_text(errors="replace").splitlines()[-30:]
    return out


def summary_line(r: dict[str, Any]) -> str:
    """A short result per part for the table."""
    if r["status"] != "passed":
        return r.get("reason", "")
    name = r["part"]
    if name == "kernel-tests":
        return r.get("summary", "")
    if name == "kernel-cuda":
        cases = r.get("cases", [])
        worst = {m: max((c[k] for c in cases if c["mode"] == m for k in ("grad_weight", "grad_bias", "grad_features")),
                        default=0.0) for m in sorted({c["mode"] for c in cases})}
        return f"{len(cases)} cases within tolerance; worst relative error by mode {worst}; Triton path used: " \
               f"{r.get('triton_path_used')}"
    if name == "bench-kernel":
        h = r.get("whole_split_fused", {})
        return (f"fused whole split N={h.get('n')} C={h.get('c')} D={h.get('d')}: {h.get('ieee_fp32_ms', 0):.2f} ms "
                f"IEEE fp32 ({h.get('ieee_fp32_tflops', 0):.1f} TFLOP/s), {h.get('tf32_ms', 0):.2f} ms TF32 "
                f"({h.get('tf32_tflops', 0):.1f} TFLOP/s)")
    if name == "distill-steps":
        parts = [f"{m['mode']}: {m['s_per_step']:.3f} s/step, peak {m['peak_memory_gib']:.2f} GiB "
                 f"(chunk {m['copies_per_pass']}/{m['copies_per_step']}, real rows {m['real_rows_per_step']})"
                 for m in r.get("modes", [])]
        return "; ".join(parts)
    if name == "build":
        return (f"{r['build_img_s']} img/s build vs {r['bare_forward_img_s']} img/s bare forward "
                f"(ratio {r['ratio']}, {r['backbone']} {r['image_size']} px, {r['images']} JPEGs, {r['workers']} workers)")
    if name == "torchrun":
        runs = [f"nproc {d['nproc']}: exit 0, {d['steps_recorded']} steps, device {d['device']}, distributed backend "
                f"{(d['distributed'] or {}).get('backend')}" for d in r.get("distill", [])]
        coll = sorted({(c.get("world_size"), c.get("backend")) for c in r.get("collectives", [])})
        return "; ".join(runs) + f"; collectives ok (world size, backend): {coll}"
    return ""


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    from benchmarks.common import markdown_table

    rows = [{"part": r["part"], "status": r["status"], "seconds": r["seconds"], "timeout": r["timeout_s"],
             "result": summary_line(r).replace("|", "/")} for r in results]
    text = [f"{'DRY RUN ON CPU (plumbing only, tiny sizes; no GPU involved)' if meta['dry_run_cpu'] else 'CUDA'}: "
            f"{meta['passed']}/{len(results)} parts passed in {meta['wall_seconds']} s (budget {meta['budget_s']} s).\n",
            markdown_table(rows)]
    for r in results:
        if r["part"] == "distill-steps" and r.get("modes"):
            text += ["\n## distill-steps\n", f"Setup: {r['setup']}\n",
                     markdown_table([{k: m[k] for k in ("mode", "s_per_step", "peak_memory_gib", "copies_per_step",
                                                        "copies_per_pass", "real_rows_per_step", "real_plan")}
                                     for m in r["modes"]])]
        if r["part"] == "bench-kernel" and r.get("rows"):
            text += ["\n## bench-kernel\n", markdown_table(r["rows"])]
    return "\n".join(text) + "\n"


def cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="run every part on the CPU at tiny sizes (tests the plumbing on a machine without a GPU)")
    p.add_argument("--budget-seconds", type=float, default=TOTAL_BUDGET_S, help="the whole check's time limit")
    p.add_argument("--timeout-scale", type=float, default=None,
                   help="multiply every part's timeout (default 1 on CUDA, 3 for --dry-run-cpu)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="results folder (default: benchmarks/results on CUDA, a temp dir for --dry-run-cpu)")
    p.add_argument("--keep-work", action="store_true", help="keep the temp work dir (logs of every part)")
    p.add_argument("--part", help=argparse.SUPPRESS)               # internal: run one part in this process
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--collective-worker", help=argparse.SUPPRESS)  # internal: under torchrun
    args = p.parse_args(argv)

    if args.collective_worker:
        return collective_worker(args.collective_worker)
    if args.part:
        return run_part_here(args.part, args.dry_run_cpu, args.work, args.result)
    if not args.dry_run_cpu and not cuda_visible():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False): nothing run; "
              "use a machine with a GPU, or --dry-run-cpu to test the plumbing here", flush=True)
        return 2

    import shutil

    from benchmarks.common import RESULTS_DIR, machine_info, write_results

    dry = args.dry_run_cpu
    scale = args.timeout_scale if args.timeout_scale is not None else (3.0 if dry else 1.0)
    budget = args.budget_seconds * (scale if dry else 1.0)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu_check_results_")) if dry else RESULTS_DIR)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    started = time.perf_counter()
    results = []
    try:
        for i, name in enumerate(args.parts):
            remaining = budget - (time.perf_counter() - started)
            later = sum(PARTS[n][0] * scale for n in args.parts[i + 1:])
            # Each part gets its own timeout, shrunk when the parts still to come would overrun the budget
            # (they keep at least a third of theirs).
            timeout = min(PARTS[name][0] * scale, max(15.0, remaining - later / 3))
            if remaining < 15:
                results.append({"part": name, "status": "skipped", "seconds": 0, "timeout_s": 0, "budget_skipped": True,
                                "reason": f"the {budget:.0f} s budget was spent"})
            else:
                print(f"gpu_check: {name} ({PARTS[name][1]}), timeout {timeout:.0f} s ...", file=sys.stderr, flush=True)
                results.append(run_part(name, timeout, dry, work))
            r = results[-1]
            print(f"gpu_check: {name}: {r['status']} in {r['seconds']} s"
                  f"{'' if r['status'] == 'passed' else ': ' + r.get('reason', '')}", file=sys.stderr, flush=True)
        for name in PARTS:
            if name not in args.parts:
                results.append({"part": name, "status": "skipped", "seconds": 0, "timeout_s": 0,
                                "reason": "not selected (--parts)"})
        passed = sum(r["status"] == "passed" for r in results)
        # A part skipped because the time budget ran out counts as a failure of the check.
        failed = [r["part"] for r in results if r["status"] == "failed" or r.get("budget_skipped")]
        meta = {"dry_run_cpu": dry, "device": "cpu" if dry else "cuda", "budget_s": round(budget),
                "wall_seconds": round(time.perf_counter() - started, 1), "passed": passed,
                "work_dir": str(work) if args.keep_work else None, "machine": machine_info()}
        if not dry:
            import torch

            meta["cuda"] = {"devices": torch.cuda.device_count(), "torch_cuda": torch.version.cuda,
                            "name": torch.cuda.get_device_name(0)}
            try:
                import triton

                meta["triton"] = triton.__version__
            except ImportError:
                meta["triton"] = None
        json_path, md_path = write_results("gpu_check", {"meta": meta, "parts": results}, markdown(results, meta),
                                           out_dir)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: {passed}/{len(results)} parts passed{', failed: ' + ', '.join(failed) if failed else ''} in "
          f"{meta['wall_seconds']} s; wrote {json_path} and {md_path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
