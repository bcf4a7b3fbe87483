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
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from benchmarks.gpu_check_build import part_build
from benchmarks.gpu_check_context import Context, one_line, tail_reason
from benchmarks.gpu_check_distill import part_distill_steps
from benchmarks.gpu_check_kernels import part_bench_kernel, part_kernel_cuda, part_kernel_tests
from benchmarks.gpu_check_report import markdown
from benchmarks.gpu_check_torchrun import collective_worker, part_torchrun
from benchmarks.harness import run_child

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


def cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.collective_worker:
        return collective_worker(args.collective_worker)
    if args.part:
        return run_part_here(args.part, args.dry_run_cpu, args.work, args.result)
    if not args.dry_run_cpu and not cuda_visible():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False): nothing run; "
              "use a machine with a GPU, or --dry-run-cpu to test the plumbing here", flush=True)
        return 2
    return run_check(args)


def run_check(args: argparse.Namespace) -> int:
    """Every selected part in its own process within the time budget, then the results written."""
    import shutil

    from benchmarks.common import RESULTS_DIR, write_results

    dry = args.dry_run_cpu
    scale = args.timeout_scale if args.timeout_scale is not None else (3.0 if dry else 1.0)
    budget = args.budget_seconds * (scale if dry else 1.0)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu_check_results_")) if dry else RESULTS_DIR)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    started = time.perf_counter()
    try:
        results = run_parts(args.parts, budget, scale, dry, work, started)
        passed = sum(r["status"] == "passed" for r in results)
        # A part skipped because the time budget ran out counts as a failure of the check.
        failed = [r["part"] for r in results if r["status"] == "failed" or r.get("budget_skipped")]
        meta = check_meta(dry, budget, started, passed, work if args.keep_work else None)
        json_path, md_path = write_results("gpu_check", {"meta": meta, "parts": results}, markdown(results, meta),
                                           out_dir)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: {passed}/{len(results)} parts passed{', failed: ' + ', '.join(failed) if failed else ''} in "
          f"{meta['wall_seconds']} s; wrote {json_path} and {md_path}", file=sys.stderr)
    return 1 if failed else 0


def run_parts(parts: list[str], budget: float, scale: float, dry: bool, work: Path,
              started: float) -> list[dict[str, Any]]:
    """The selected parts one after another, each with its own timeout, shrunk when the parts still to come
    would overrun the budget (they keep at least a third of theirs); the others listed as skipped."""
    results = []
    for i, name in enumerate(parts):
        remaining = budget - (time.perf_counter() - started)
        later = sum(PARTS[n][0] * scale for n in parts[i + 1:])
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
        if name not in parts:
            results.append({"part": name, "status": "skipped", "seconds": 0, "timeout_s": 0,
                            "reason": "not selected (--parts)"})
    return results


def check_meta(dry: bool, budget: float, started: float, passed: int, kept_work: Path | None) -> dict[str, Any]:
    """The check's stamp: dry run or CUDA, the budget, the wall time, the parts passed, the machine and,
    on CUDA, the devices and versions."""
    from benchmarks.common import machine_info

    meta = {"dry_run_cpu": dry, "device": "cpu" if dry else "cuda", "budget_s": round(budget),
            "wall_seconds": round(time.perf_counter() - started, 1), "passed": passed,
            "work_dir": str(kept_work) if kept_work is not None else None, "machine": machine_info()}
    if not dry:
        import torch

        meta["cuda"] = {"devices": torch.cuda.device_count(), "torch_cuda": torch.version.cuda,
                        "name": torch.cuda.get_device_name(0)}
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
    return meta


if __name__ == "__main__":
    sys.exit(main())
