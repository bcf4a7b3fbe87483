"""Diagnostic (issue 19): the budget (steps beyond 1000, `--augs 10`) and a pixel-statistics prior, under the
defaults, on the whole test split.

Budget: the default runs of benchmarks.diag_lr_schedule (1000 steps, plateau schedule) continued to 2000
steps (a copy of the 1000-step run resumed with `--steps 2000`: bit for bit the 2000-step run, as
`test_steps_may_grow_on_resume_under_grow_every_auto` checks; without that run it distills from step 0), and
the CNN's set (400 and 1000 steps) and DINOv2's (400 steps) with `--augs 2` and `--augs 10`.

Pixel prior (`--pixel-prior`, engine.distill.pixel_prior): a hinge that keeps each image's per-channel pixel
mean and std within one spread of its class's real images. Measured where the pixels stay real (the
defaults, 1000 steps) and where they do not (the old rate 10 / steps = 0.033 from the same centroid images,
300 steps, constant: the run that read 35.1 on DINOv2 in diag_defaults), each with and without it. Every
set's pixel statistics are listed beside the data's, with the prior's value (weight 1) against the real
images' statistics.

Fashion-MNIST, 500 train images per class, 112 px, ipc 1, everything else at its default; evaluation on the
whole test split (10,000 images) with the authors' protocol, 5 probe seeds, on efficientnet-lite0,
dinov2-vits14-imgfocus and the held-out opennsfw-resnet50. The stores and the 1000-step rows are those of
benchmarks.diag_lr_schedule (the same --work).

    python -m benchmarks.diag_budget                  # ~5 h on 2 CPU cores (cached: a rerun continues)
    python -m benchmarks.diag_budget --only lgm-effnet-prior-1000

Results: benchmarks/results/diag_budget.{json,md}.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks import diag_lr_schedule
from benchmarks.common import markdown_table, write_results
from benchmarks.diag_defaults import AUGS, DINOV2, EFFNET, IMAGE_SIZE, SHORT, TRAIN_PER_CLASS, pixel_stats
from benchmarks.diag_lr_schedule import copy_grid, schedule_columns
from benchmarks.harness import distill_unless_done, fashion_mnist_refused, run_finished
from engine.distill.outdir import IMAGES_DIR
from featurestore.runtime import atomic_write_json

SEEDS = 5
OLD_RATE = {"lr": 10 / 300, "lr_schedule": "constant"}  # --lr auto before 2026-12-05 at 300 steps

# name -> (backbones, steps, options beyond the defaults, the diag_lr_schedule run it continues or None)
RUNS: dict[str, tuple[list[str], int, dict[str, Any], str | None]] = {
    "lgm-effnet-plateau-1000": ([EFFNET], 1000, {}, None),
    "lgm-effnet-plateau-2000": ([EFFNET], 2000, {}, "lgm-effnet-plateau-1000"),
    "lgm-dinov2-plateau-1000": ([DINOV2], 1000, {}, None),
    "lgm-dinov2-plateau-2000": ([DINOV2], 2000, {}, "lgm-dinov2-plateau-1000"),
    "lgm-effnet-400": ([EFFNET], 400, {}, None),
    "lgm-effnet-augs10-400": ([EFFNET], 400, {"augs": 10}, None),
    "lgm-effnet-augs10-1000": ([EFFNET], 1000, {"augs": 10}, None),
    "lgm-dinov2-400": ([DINOV2], 400, {}, None),
    "lgm-dinov2-augs10-400": ([DINOV2], 400, {"augs": 10}, None),
    "lgm-dinov2-400-seed1": ([DINOV2], 400, {"seed": 1}, None),
    "lgm-dinov2-augs10-400-seed1": ([DINOV2], 400, {"augs": 10, "seed": 1}, None),
    "lgm-effnet-prior-1000": ([EFFNET], 1000, {"pixel_prior": 1.0}, None),
    "lgm-effnet-plateau-1000-seed1": ([EFFNET], 1000, {"seed": 1}, None),
    "lgm-effnet-old-rate-300": ([EFFNET], 300, OLD_RATE, None),
    "lgm-effnet-old-rate-prior-300": ([EFFNET], 300, {**OLD_RATE, "pixel_prior": 1.0}, None),
}


class Diag(diag_lr_schedule.Diag):
    """diag_lr_schedule's stores and evaluation (its cached rows are reused: the same sets, evaluated the same
    way), with this diagnostic's runs."""

    name = "diag_budget"

    def __init__(self, work: Path, data_root: str | None) -> None:
        super().__init__(work, data_root)
        self.lr_schedule_cache = self.cache
        self.cache_path = work / "eval-cache-budget.json"
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}

    def distill(self, name: str) -> Path:
        backbones, steps, options, continues = RUNS[name]
        out = self.work / "runs" / name
        if run_finished(out):
            return out
        source = self.work / "runs" / continues if continues else None
        if source is not None and not out.exists() and run_finished(source):
            self.log(f"{name}: continues a copy of {continues}")
            shutil.copytree(source, out)
        self.log(f"distill {name}")
        distill_unless_done(out, {"store": str(self.train_store), "backbone": backbones, "steps": steps,
                                  "augs": AUGS, "seed": 0, "quiet": True, **options})
        return out

    def evaluate(self, name: str, images: Path) -> dict[str, float]:
        if name not in self.cache and name in self.lr_schedule_cache:
            self.cache[name] = self.lr_schedule_cache[name]  # the same set, evaluated the same way
            atomic_write_json(self.cache_path, self.cache)
        return super().evaluate(name, images)


def prior_reference(diag: Diag):
    """(the real images' pixel statistics, as `engine distill --pixel-prior` estimates them; the store's class
    names)."""
    from engine.distill.pixel_prior import real_pixel_statistics
    from featurestore.store import FeatureStore

    store = FeatureStore.open(str(diag.train_store))
    split = store.split(EFFNET, "train")
    return real_pixel_statistics(split, store.num_classes, split.resize_size), store.class_names


def run_row(diag: Diag, name: str, reference) -> dict[str, Any]:
    backbones, steps, options, _ = RUNS[name]
    out = diag.distill(name)
    return {"set": name, "distilled on": "+".join(SHORT[b] for b in backbones), "steps": steps,
            "seed": options.get("seed", 0), "augs": options.get("augs", AUGS), "pixel prior": options.get("pixel_prior", 0.0),
            **diag.evaluate(name, out / IMAGES_DIR), **pixel_columns(out / IMAGES_DIR, reference),
            **schedule_columns(out), "grid": copy_grid(out, "diag_budget_grids", name)}


def pixel_columns(folder: Path, reference) -> dict[str, Any]:
    """The set's grey-level statistics and the prior's value (weight 1) against the real images'."""
    from engine.distill.pixel_prior import pixel_prior
    from engine.imagefolder import read_imagefolder

    statistics, class_names = reference
    stats = pixel_stats(folder)
    images, labels, _ = read_imagefolder(folder, class_names=class_names)  # labels as the store's classes
    return {"pixel mean": stats["mean"], "pixel std": stats["std"], "share <= 0.02": stats["near_0"],
            "share >= 0.98": stats["near_1"], "prior value": round(float(pixel_prior(images, labels, statistics)), 4)}


def main(argv: list[str] | None = None) -> int:
    args = diag_lr_schedule.parse_args(argv, __doc__, list(RUNS))
    if fashion_mnist_refused(args.data_root):
        return 2
    diag = Diag(args.work, args.data_root)
    diag.build_stores()
    reference = prior_reference(diag)
    rows = [{"set": name, **diag.evaluate(name, images), **pixel_columns(images, reference)}
            for name, images in (("centroid-effnet", diag.baseline("centroid", EFFNET)),
                                 ("random", diag.baseline("random", EFFNET)))]
    for name in args.only or RUNS:  # written after each run: an interrupted diagnostic keeps its rows
        rows.append(run_row(diag, name, reference))
        write_rows(rows, reference)
    return 0


def write_rows(rows: list[dict[str, Any]], reference) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    data_mean = float(reference[0].mean[:, 0].mean())
    text = (f"Fashion-MNIST, {TRAIN_PER_CLASS} train images per class, {IMAGE_SIZE} px, ipc 1, from the centroid "
            f"images (the default --init), --augs {AUGS} unless the row says, every other option at its default "
            f"(lr 2e-3, plateau schedule) unless the row says; top-1 % on the whole test split (10,000 images), "
            f"{SEEDS} probe seeds. Pixel mean / std: the grey level over the set's images (the data's mean over "
            f"the 32 real images per class the prior reads: {data_mean:.3f}). Prior value: `--pixel-prior`'s "
            f"term at weight 1 against those real images' statistics (0: every image within one spread of its "
            f"class). Step seconds: the run's mean, its checks excluded, on 2 CPU cores shared with a varying number "
            f"of other runs: not comparable across rows.\n\n"
            + markdown_table(rows, columns))
    write_results("diag_budget", {"rows": rows}, text)
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
