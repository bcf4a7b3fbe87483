"""Store mode versus end-to-end mode of the same distillation, side by side in one benchmark run.

For each configuration (classes C, images per class, augmented copies) the same method, backbone,
synthetic set and step count run in these modes:
- `end-to-end`: real images are loaded, augmented and pushed through the backbone every step, and the
  whole synthetic graph is kept (the authors' way: `--real-source images --chunk M`);
- `store`: the real side comes from stored features, the synthetic graph is kept (`--chunk M`);
- `store+chunk`: stored features and chunked back-propagation (`--chunk 16`);
- `store+chunk+full`: as above, with the exact gradient over the whole train split every step.
Each measurement runs in a fresh child process (same machine, same run), so peak RSS is that mode's
own and not the high-water mark of an earlier one. One configuration is also run long enough to
compare the accuracy the two modes reach with the same step count.

Writes benchmarks/results/bench_distill.{json,md} and bench_distill.png.
    python -m benchmarks.bench_distill                 # CPU default, ~15 min on 2 cores
    python -m benchmarks.bench_distill --size 224 --backbone dinov2-vitb14 --configs 100x1x10 1000x1x3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_line, markdown_table, write_results

MODES = {
    "end-to-end": {"real_source": "images", "chunk": "full-graph"},
    "store": {"real_source": "store", "chunk": "full-graph"},
    "store+chunk": {"real_source": "store", "chunk": 16},
    "store+chunk+full": {"real_source": "store", "chunk": 16, "real_batch": "full"},
}


def parse_config(text: str) -> tuple[int, int, int]:
    c, ipc, augs = (int(v) for v in text.lower().split("x"))
    return c, ipc, augs


def make_imagefolder(root: Path, num_classes: int, per_class: dict[str, int]) -> None:
    """Procedural class-conditional images (the `synthetic` generator) written as PNG files."""
    from PIL import Image

    from featurestore.datasets.gratings import GratingsConfig, render_grating

    cfg = GratingsConfig(num_classes=num_classes)
    for split, n in per_class.items():
        for c in range(num_classes):
            d = root / split / f"class{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = d / f"{i:04d}.png"
                if not path.exists():
                    Image.fromarray(render_grating(c, split, c * 10_000 + i, cfg)).save(path)


def _proc_status_mb(field: str) -> float:
    """VmHWM / VmRSS of this process in MB. Unlike ru_maxrss, VmHWM starts afresh at exec, so the
    parent's memory (inherited through fork) does not count."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    """One measured run (in its own process): distill `steps` steps, report time/step and peak memory."""
    import torch

    from engine.distill import DistillConfig, distill

    torch.manual_seed(0)
    rss_start = _proc_status_mb("VmRSS")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg = DistillConfig(**spec["config"])
    t = time.time()
    result = distill(cfg)
    wall = time.time() - t
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line]
    step_s = [r["step_seconds"] for r in rows[1:]] or [rows[0]["step_seconds"]]  # first step warms up
    out = {"seconds_per_step": statistics.median(step_s), "wall_seconds": wall,
           "peak_rss_mb": _proc_status_mb("VmHWM"),
           "rss_at_start_mb": rss_start, "final_loss": result.losses[-1]}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(config: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = dict(config, out=str(Path(tmp) / "out"))
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_distill", "--child",
                               json.dumps({"config": config})], capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--size", type=int, default=112, help="backbone input size (px)")
    p.add_argument("--configs", nargs="+", default=["10x1x2", "10x1x10", "40x1x10", "100x1x8"],
                   help="CxIPCxAUGS configurations, e.g. 10x1x4")
    p.add_argument("--steps", type=int, default=2, help="measured steps per run (the first is warm-up)")
    p.add_argument("--train-per-class", type=int, default=30)
    p.add_argument("--accuracy-config", default="10x1x2")
    p.add_argument("--accuracy-steps", type=int, default=60)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default=None, help="where to keep the generated images and stores")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    from featurestore.build import build

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_distill_"))
    print(f"bench_distill: {machine_line()}\nwork dir {work}", file=sys.stderr)
    configs = [parse_config(c) for c in args.configs]
    acc_cfg = parse_config(args.accuracy_config)
    stores: dict[int, Path] = {}
    for c in sorted({cfg[0] for cfg in configs} | {acc_cfg[0]}):
        data = work / f"images-{c}"
        make_imagefolder(data, c, {"train": args.train_per_class, "val": 10})
        stores[c] = work / f"fs-{c}"
        build("imagefolder", args.backbone, stores[c], data_root=data, image_size=args.size, dtype="fp32",
              device=args.device, quiet=True)

    rows = []
    for c, ipc, augs in configs:
        m = c * ipc * augs
        for mode, opts in MODES.items():
            config = {"store": str(stores[c]), "backbone": args.backbone, "out": "", "ipc": ipc, "augs": augs,
                      "steps": args.steps, "real_source": opts["real_source"], "grow_every": 1,
                      "chunk": m if opts["chunk"] == "full-graph" else opts["chunk"],
                      "real_batch": opts.get("real_batch"), "device": args.device, "quiet": True,
                      "checkpoint_every": 10_000}
            print(f"  C={c} ipc={ipc} augs={augs} (M={m}) {mode} ...", file=sys.stderr, flush=True)
            res = run_child(config)
            rows.append({"C": c, "ipc": ipc, "augs": augs, "M": m, "mode": mode, **res})
            print(f"    {res}", file=sys.stderr, flush=True)

    # Accuracy reached with the same number of steps, end-to-end vs store.
    acc_rows = []
    c, ipc, augs = acc_cfg
    from engine.evaluate import evaluate

    for mode in ("end-to-end", "store"):
        out = work / f"acc-{mode}"
        config = {"store": str(stores[c]), "backbone": args.backbone, "out": str(out), "ipc": ipc, "augs": augs,
                  "steps": args.accuracy_steps, "real_source": MODES[mode]["real_source"],
                  "grow_every": max(1, args.accuracy_steps // 8), "device": args.device, "quiet": True}
        from engine.distill import DistillConfig, distill

        if not (out / "distilled.safetensors").is_file():
            distill(DistillConfig(**config))
        ev = evaluate(str(stores[c]), {mode: str(out / "images")}, [args.backbone], seeds=3, epochs=300,
                      device=args.device, quiet=True)
        cell = ev.rows[mode][args.backbone]
        acc_rows.append({"mode": mode, "C": c, "ipc": ipc, "augs": augs, "steps": args.accuracy_steps,
                         "top1_mean": cell.top1_mean, "top1_std": cell.top1_std})

    summary = summarize(rows)
    payload = {"backbone": args.backbone, "size": args.size, "steps": args.steps, "rows": rows,
               "accuracy": acc_rows, "summary": summary}
    md = [f"Backbone `{args.backbone}` at {args.size} px; {args.steps} steps per run (median step time after "
          "the first); peak memory = peak RSS of a fresh child process per run (CUDA: max allocated).\n",
          markdown_table(rows, ["C", "ipc", "augs", "M", "mode", "seconds_per_step", "peak_rss_mb",
                                "rss_at_start_mb", "final_loss"]),
          "\n## Ratios at the largest configuration end-to-end ran\n", markdown_table([summary]),
          "\n## Accuracy reached with the same steps\n", markdown_table(acc_rows)]
    write_results("bench_distill", payload, "\n".join(md))
    plot(rows, RESULTS_DIR / "bench_distill.png")
    print("\n".join(md))
    return 0


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    e2e = [r for r in ok if r["mode"] == "end-to-end"]
    if not e2e:
        return {}
    largest = max(e2e, key=lambda r: r["M"])
    same = {r["mode"]: r for r in ok if r["M"] == largest["M"] and r["C"] == largest["C"]}
    out = {"M": largest["M"], "C": largest["C"]}
    for mode in ("store", "store+chunk", "store+chunk+full"):
        if mode in same:
            out[f"memory e2e/{mode}"] = largest["peak_rss_mb"] / same[mode]["peak_rss_mb"]
            out[f"time e2e/{mode}"] = largest["seconds_per_step"] / same[mode]["seconds_per_step"]
    chunked = sorted((r for r in ok if r["mode"] == "store+chunk"), key=lambda r: r["M"])
    if len(chunked) >= 2:
        first, last = chunked[0], chunked[-1]
        out["store+chunk memory growth (peak, largest/smallest M)"] = last["peak_rss_mb"] / first["peak_rss_mb"]
        out["M growth"] = last["M"] / first["M"]
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        pts = sorted((r["M"], r["peak_rss_mb"], r["seconds_per_step"]) for r in rows
                     if r["mode"] == mode and "error" not in r)
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=mode)
    axes[0].set(xlabel="synthetic copies per step M = C*ipc*augs", ylabel="peak memory (MB)", xscale="log")
    axes[1].set(xlabel="M", ylabel="seconds per step", xscale="log")
    ticks = sorted({r["M"] for r in rows})
    for ax in axes:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"store vs end-to-end distillation ({machine_line()})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
