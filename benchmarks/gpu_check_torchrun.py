"""gpu_check's torchrun part: `engine distill` under torchrun on a tiny store, and the NCCL (gloo on the CPU)
collective smoke test its workers run (`collective_worker`, behind `--collective-worker`)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from benchmarks.gpu_check_context import Context, one_line, tail_reason
from benchmarks.harness import run_child


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
