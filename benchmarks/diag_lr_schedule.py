"""Diagnostic (issue 19): the learning-rate schedule from real images, on the whole test split.

From the centroid images at a constant 2e-3 (the authors' rate), efficientnet-lite0's set gains nothing on
its own backbone after ~300 steps while its accuracy on DINOv2 falls (49.3 at 300 steps, 47.2 at 1000 on the
whole test split: benchmarks/results/diag_defaults.md): the late movement is read by the distillation
backbone only. A cosine decay of the rate over --steps damps that late movement, but also DINOv2's own
late gain; `plateau` (the default since 2026-12-06) halves the rate once the set's fit to the stored train
features stops improving. This measures the three target sets of issue 19 (1000 steps, `--augs 2`, every
other option at its default) under each schedule, and a second distillation seed of the CNN's set.

Fashion-MNIST, 500 train images per class, 112 px, ipc 1; evaluation on the whole test split (10,000
images) with the authors' protocol, 5 probe seeds, on efficientnet-lite0, dinov2-vits14-imgfocus and the
held-out opennsfw-resnet50. The stores are the ones benchmarks.diag_defaults builds (the same builds).

    python -m benchmarks.diag_lr_schedule                 # ~2.5 h on 2 CPU cores (cached: a rerun continues)
    python -m benchmarks.diag_lr_schedule --only lgm-effnet-cosine-1000

Results: benchmarks/results/diag_lr_schedule.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, WORK_DIR, markdown_table, write_results
from benchmarks.harness import distill_unless_done, fashion_mnist_refused
from engine.distill.outdir import GRID_FILE, IMAGES_DIR, METRICS_FILE
from featurestore.runtime import atomic_write_bytes, atomic_write_json

# The same data, sizes and backbones as diag_defaults (its stores are shared through --work).
from benchmarks import diag_defaults
from benchmarks.diag_defaults import AUGS, DINOV2, EFFNET, EVAL_BACKBONES, IMAGE_SIZE, SHORT, TRAIN_PER_CLASS

STEPS, SEEDS = 1000, 5
BOTH = [EFFNET, DINOV2]

# name -> (backbones distilled on, --lr-schedule, --seed)
RUNS: dict[str, tuple[list[str], str, int]] = {
    "lgm-effnet-plateau-1000": ([EFFNET], "plateau", 0),
    "lgm-dinov2-plateau-1000": ([DINOV2], "plateau", 0),
    "lgm-both-plateau-1000": (BOTH, "plateau", 0),
    "lgm-effnet-plateau-1000-seed1": ([EFFNET], "plateau", 1),
    "lgm-dinov2-plateau-1000-seed1": ([DINOV2], "plateau", 1),
    "lgm-effnet-cosine-1000": ([EFFNET], "cosine", 0),
    "lgm-dinov2-cosine-1000": ([DINOV2], "cosine", 0),
    "lgm-both-cosine-1000": (BOTH, "cosine", 0),
    "lgm-effnet-constant-1000": ([EFFNET], "constant", 0),
    "lgm-effnet-cosine-1000-seed1": ([EFFNET], "cosine", 1),
    "lgm-effnet-constant-1000-seed1": ([EFFNET], "constant", 1),
    "lgm-dinov2-constant-1000": ([DINOV2], "constant", 0),
    "lgm-both-constant-1000": (BOTH, "constant", 0),
}


class Diag(diag_defaults.Diag):
    """diag_defaults' stores, baselines and whole-split build (the same folders under --work), with this
    diagnostic's runs and its own evaluation cache (whole test split only)."""

    def __init__(self, work: Path, data_root: str | None) -> None:
        super().__init__(work, data_root)
        self.train_store, self.val_store = self.stores["main"], self.stores["whole-val"]
        self.cache_path = work / "eval-cache-lr-schedule.json"
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}

    name = "diag_lr_schedule"  # the log lines' prefix (diag_fit_curve shares this class)

    def log(self, text: str) -> None:
        print(f"[{self.name} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def build_stores(self) -> None:
        """The train split (500 per class) of the two distillation backbones; the whole test split of all three."""
        from featurestore.build import build

        for backbone in BOTH:
            build("fashion-mnist", backbone, self.train_store, splits=["train"], limit_per_class=TRAIN_PER_CLASS,
                  data_root=self.data_root, image_size=IMAGE_SIZE, quiet=True)
        self.build_whole_val()

    def distill(self, name: str) -> Path:
        backbones, schedule, seed = RUNS[name]
        out = self.work / "runs" / name
        self.log(f"distill {name}")
        distill_unless_done(out, {"store": str(self.train_store), "backbone": backbones, "steps": STEPS,
                                  "augs": AUGS, "lr_schedule": schedule, "seed": seed, "quiet": True})
        return out

    def evaluate(self, name: str, images: Path) -> dict[str, float]:
        from engine.evaluate import evaluate

        if name not in self.cache:
            self.log(f"evaluate {name}")
            result = evaluate(str(self.val_store), {name: str(images)}, list(EVAL_BACKBONES), seeds=SEEDS, quiet=True)
            self.cache[name] = {SHORT[b]: round(result.rows[name][b].top1_mean, 1) for b in EVAL_BACKBONES}
            atomic_write_json(self.cache_path, self.cache)
        return {SHORT[b]: self.cache[name][SHORT[b]] for b in EVAL_BACKBONES}  # one column order


def run_row(diag: Diag, name: str) -> dict[str, Any]:
    backbones, schedule, seed = RUNS[name]
    out = diag.distill(name)
    return {"set": name, "distilled on": "+".join(SHORT[b] for b in backbones), "lr schedule": schedule,
            "seed": seed, **diag.evaluate(name, out / IMAGES_DIR), **schedule_columns(out),
            "grid": copy_grid(out, "diag_lr_schedule_grids", name)}


def schedule_columns(out: Path) -> dict[str, Any]:
    """A finished run's last loss, first and last rate, the checks at which plateau halved the rate, and its
    mean step time (from its metrics.jsonl)."""
    metrics = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "loss" in m]  # not the fit checks of --lr-schedule plateau
    checks = [m for m in metrics if "lr_scale" in m]
    halved = [c["step"] for before, c in zip([{"lr_scale": 1.0}] + checks, checks) if c["lr_scale"] < before["lr_scale"]]
    return {"final loss": round(steps[-1]["loss"], 4), "first rate": f"{steps[0]['lr']:.3g}",
            "last rate": f"{steps[-1]['lr']:.3g}",
            "rate halved at checks": (", ".join(map(str, halved)) or "none") if checks else "-",
            "step seconds": round(sum(m["step_seconds"] for m in steps) / len(steps), 2)}


def copy_grid(out: Path, folder: str, name: str) -> str:
    """The run's grid.png copied beside the results (`folder` under benchmarks/results); its markdown link."""
    grids = RESULTS_DIR / folder
    grids.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(grids / f"{name}.png", (out / GRID_FILE).read_bytes())
    return f"[png]({folder}/{name}.png)"


def parse_args(argv: list[str] | None, description: str, runs: list[str]) -> argparse.Namespace:
    """The options of the whole-split diagnostics: --work (the stores and runs of diag_defaults), --data-root,
    --only NAME... (a subset of `runs`)."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=WORK_DIR / "diag_defaults")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--only", nargs="+", default=None, choices=runs, metavar="NAME",
                        help="only these runs (see RUNS)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__, list(RUNS))
    if fashion_mnist_refused(args.data_root):
        return 2
    diag = Diag(args.work, args.data_root)
    diag.build_stores()
    rows = [{"set": name, "distilled on": "-", "lr schedule": "-", "seed": "-", **diag.evaluate(name, images)}
            for name, images in (("centroid-effnet", diag.baseline("centroid", EFFNET)),
                                 ("centroid-dinov2", diag.baseline("centroid", DINOV2)),
                                 ("random", diag.baseline("random", EFFNET)))]
    for name in args.only or RUNS:  # the results are written after each run: an interrupted bench keeps its rows
        rows.append(run_row(diag, name))
        write_rows(rows)
    return 0


def write_rows(rows: list[dict[str, Any]]) -> None:
    text = (f"Fashion-MNIST, {TRAIN_PER_CLASS} train images per class, {IMAGE_SIZE} px, ipc 1, --augs {AUGS}, "
            f"{STEPS} steps from the centroid images (the default --init), lr 2e-3 at the start; top-1 % on the whole test split "
            f"(10,000 images), {SEEDS} probe seeds. Runs not listed were not run (see RUNS in the script). Step "
            f"seconds: the run's mean, its checks excluded, on 2 CPU cores shared with a varying number of other "
            f"runs: not comparable across rows.\n\n"
            + markdown_table(rows, list(rows[-1])))  # the last row is a run's: every column
    write_results("diag_lr_schedule", {"rows": rows, "steps": STEPS, "augs": AUGS}, text)
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
