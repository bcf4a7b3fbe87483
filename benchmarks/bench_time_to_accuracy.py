"""Benchmark: accuracy against wall-clock time, end-to-end LGM vs the store with its defaults.

The store's value is not a faster step (on a GPU the real forward is a fraction of a synthetic
forward + backward) but fewer steps to the same accuracy (the exact whole-split gradient every step) and
no data loading. Both runs distill the same Fashion-MNIST classes from the same seed and the same noise
init, with --augs 2 and the same step count:
- `end-to-end`: the authors' way: `--real-source images --real-batch ipc*augs*C` (real images decoded,
  augmented and pushed through the backbone every step);
- `store`: `engine distill` with its defaults (stored features, --real-batch auto).
`--eval-every K` probes each run's current images every K steps (a cheap probe: 1 seed, 10 views, 300
epochs, on the store's val features; distillation time excludes it). Reported: accuracy vs seconds for
each run, and the ratio of the wall time end-to-end needs to reach its final accuracy to the time the
store needs to reach the same accuracy (JSON `summary.time_to_accuracy_ratio`; the goal is >= 10x).

    python -m benchmarks.bench_time_to_accuracy            # ~30 min on 2 CPU cores
    python -m benchmarks.bench_time_to_accuracy --steps 1000 --eval-every 50
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import (FASHION_MNIST_IMAGE_SIZE, FASHION_MNIST_STORE,  # noqa: E402
                               FASHION_MNIST_TRAIN_PER_CLASS, RESULTS_DIR, fashion_mnist_missing, fashion_mnist_store,
                               machine_line, markdown_table, save_figure, write_results)

BACKBONE = "efficientnet-lite0"
IMAGE_SIZE = FASHION_MNIST_IMAGE_SIZE
TRAIN_PER_CLASS = FASHION_MNIST_TRAIN_PER_CLASS
AUGS = 2


def run(store: Path, out: Path, mode: str, steps: int, eval_every: int, device: str) -> list[dict[str, Any]]:
    from engine.distill import DistillConfig, distill

    if not (out / "distilled.safetensors").is_file():
        options: dict[str, Any] = {}
        if mode == "end-to-end":
            options = {"real_source": "images", "real_batch": AUGS * 10}  # ipc * augs * C, the authors'
        if out.exists() and not (out / "checkpoint.pt").is_file():
            import shutil

            shutil.rmtree(out)
        distill(DistillConfig(store=str(store), backbone=BACKBONE, out=str(out), steps=steps, augs=AUGS,
                              eval_every=eval_every, device=device, quiet=True,
                              resume=(out / "checkpoint.pt").is_file(), **options))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def curve(metrics: list[dict[str, Any]]) -> list[dict[str, float]]:
    """(step, distillation seconds, probe top-1) at every probe."""
    return [{"step": m["step"], "seconds": m["seconds"], "top1": m["probe_top1"]} for m in metrics if "probe_top1" in m]


def time_to_reach(points: list[dict[str, float]], target: float) -> float | None:
    """Seconds of the first probe at or above `target` (None if never)."""
    return next((p["seconds"] for p in points if p["top1"] >= target), None)


def plot(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, points in curves.items():
        ax.plot([p["seconds"] for p in points], [p["top1"] for p in points], marker="o", label=mode)
    ax.set_xlabel("distillation wall-clock seconds (probe time excluded)")
    ax.set_ylabel("cheap-probe top-1 (%)")
    ax.set_title(f"LGM on Fashion-MNIST, {BACKBONE} {IMAGE_SIZE} px, --augs {AUGS} ({machine_line()})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "benchmarks" / "work" / "time_to_accuracy")
    parser.add_argument("--store", type=Path, default=FASHION_MNIST_STORE, help="the Fashion-MNIST store (built or "
                        "completed for the backbone if needed; shared with bench_quality)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    missing = fashion_mnist_missing(args.data_root)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    store = args.store
    fashion_mnist_store([BACKBONE], store, args.data_root, args.device)
    curves = {}
    totals = {}
    for mode in ("end-to-end", "store"):
        metrics = run(store, args.work / f"{mode}-{args.steps}", mode, args.steps, args.eval_every, args.device)
        curves[mode] = curve(metrics)
        steps = [m for m in metrics if "loss" in m]
        totals[mode] = {"seconds": steps[-1]["seconds"], "seconds_per_step": steps[-1]["seconds"] / len(steps),
                        "final_probe_top1": curves[mode][-1]["top1"]}
    target = curves["end-to-end"][-1]["top1"]
    e2e_seconds = totals["end-to-end"]["seconds"]
    store_seconds = time_to_reach(curves["store"], target)
    summary = {"end_to_end_final_top1": target, "end_to_end_seconds": round(e2e_seconds, 1),
               "store_seconds_to_reach_it": None if store_seconds is None else round(store_seconds, 1),
               "time_to_accuracy_ratio": None if store_seconds is None else round(e2e_seconds / store_seconds, 2),
               "store_final_top1": curves["store"][-1]["top1"],
               "seconds_per_step": {m: round(t["seconds_per_step"], 3) for m, t in totals.items()},
               "goal": ">= 10x"}
    payload = {"backbone": BACKBONE, "image_size": IMAGE_SIZE, "augs": AUGS, "steps": args.steps,
               "eval_every": args.eval_every, "curves": curves, "summary": summary}
    md = [f"LGM, Fashion-MNIST ({TRAIN_PER_CLASS} train images per class, the whole test split), {BACKBONE} at "
          f"{IMAGE_SIZE} px, ipc 1, --augs {AUGS}, {args.steps} steps each, same seed and init (the default at the time of the run, recorded in its config.json). Probe every "
          f"{args.eval_every} steps: 1 seed, 10 views, 300 epochs (cheap, noisier than the full protocol); its time "
          "is excluded from the distillation seconds.\n",
          "## Summary\n", "```json\n" + json.dumps(summary, indent=2) + "\n```\n"]
    for mode, points in curves.items():
        md.append(f"## {mode}\n\n" + markdown_table(points))
    md.append("![accuracy vs time](bench_time_to_accuracy.png)\n")
    plot(curves, args.out_dir / "bench_time_to_accuracy.png")
    json_path, md_path = write_results("bench_time_to_accuracy", payload, "\n".join(md), args.out_dir)
    print(f"wrote {json_path} and {md_path}; time-to-accuracy ratio {summary['time_to_accuracy_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
