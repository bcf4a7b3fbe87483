"""Diagnostic (issue 19): which starting point, learning rate and real side let a distilled set work on the
ViT and on backbones it was not made on. Short runs, side by side, that chose today's defaults.

Fashion-MNIST, 500 train images per class, 112 px, ipc 1, `--augs 2`; a SMALL val split (100 test images per
class, 1000 in all) so that the three stores build in minutes: numbers here are comparable with each other,
not with bench_quality's (the whole test split). Evaluation: the authors' protocol, 3 probe seeds (5 for
the 1000-step runs), on efficientnet-lite0, dinov2-vits14-imgfocus and the held-out opennsfw-resnet50.

Runs (each distills one set; options beyond the defaults in RUNS):
- the old default (grey images, --lr auto = 10/steps) against the new one (--init centroid: the real
  image nearest each class mean, --lr auto = the authors' 2e-3 from real images), on both backbones;
- the learning rate from real images (10/steps against 3e-3);
- the real side augmented like the synthetic copies (a store of 4 views per image: `fs build --views 4`)
  against centre crops, from the same start and rate;
- the real-image references (centroid of each backbone, random).

    python -m benchmarks.diag_defaults            # ~2 h on 2 CPU cores (cached: a rerun continues)
    python -m benchmarks.diag_defaults --only lgm-effnet-centroid-1000

Results: benchmarks/results/diag_defaults.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, WORK_DIR, markdown_table, write_results
from benchmarks.harness import distill_unless_done, fashion_mnist_refused, run_finished
from engine.distill.outdir import GRID_FILE, IMAGES_DIR, METRICS_FILE
from featurestore.runtime import atomic_write_bytes, atomic_write_json

EFFNET, DINOV2, NSFW = "efficientnet-lite0", "dinov2-vits14-imgfocus", "opennsfw-resnet50"
EVAL_BACKBONES = (EFFNET, DINOV2, NSFW)
SHORT = {EFFNET: "effnet", DINOV2: "dinov2", NSFW: "nsfw-r50"}
TRAIN_PER_CLASS, VAL_PER_CLASS, IMAGE_SIZE, AUGS = 500, 100, 112, 2
OLD = {"init": "zero"}  # the defaults before this change: grey images, --lr auto = 10 / steps

# name -> (distillation backbone, steps, options beyond the defaults, store, probe seeds)
RUNS: dict[str, tuple[str, int, dict[str, Any], str, int]] = {
    "lgm-effnet-zero-300": (EFFNET, 300, OLD, "main", 3),
    "lgm-dinov2-zero-300": (DINOV2, 300, OLD, "main", 3),
    "lgm-dinov2-centroid-lr-auto-old-300": (DINOV2, 300, {"init": "centroid", "lr": 10 / 300}, "main", 3),
    "lgm-dinov2-centroid-300": (DINOV2, 300, {"init": "centroid", "lr": 3e-3}, "main", 3),
    "lgm-dinov2-centroid-views4-300": (DINOV2, 300, {"init": "centroid", "lr": 3e-3}, "views4", 3),
    "lgm-effnet-centroid-lr-auto-old-300": (EFFNET, 300, {"init": "centroid", "lr": 10 / 300}, "main", 3),
    "lgm-effnet-centroid-300": (EFFNET, 300, {"init": "centroid", "lr": 3e-3}, "main", 3),
    "lgm-effnet-centroid-augs10-300": (EFFNET, 300, {"init": "centroid", "lr": 3e-3, "augs": 10}, "main", 3),
    "lgm-effnet-centroid-1000": (EFFNET, 1000, {}, "main", 5),
    "lgm-dinov2-centroid-1000": (DINOV2, 1000, {}, "main", 5),
    "lgm-both-centroid-400": (EFFNET, 400, {"backbone": [EFFNET, DINOV2]}, "main", 5),
    # The feature space the objective compares in (--feature-space), at the default rate 2e-3.
    "lgm-effnet-raw-300": (EFFNET, 300, {"feature_space": "raw"}, "main", 3),
    "lgm-effnet-standardized-300": (EFFNET, 300, {"feature_space": "standardized"}, "main", 3),
    "lgm-dinov2-raw-300": (DINOV2, 300, {"feature_space": "raw"}, "main", 3),
    "lgm-dinov2-standardized-300": (DINOV2, 300, {"feature_space": "standardized"}, "main", 3),
    # The objective on the ViT: every class's gradient row counts equally; larger random heads.
    "lgm-effnet-per-class-300": (EFFNET, 300, {"feature_space": "raw", "objective": {"match": "per-class"}}, "main", 3),
    "lgm-dinov2-per-class-300": (DINOV2, 300, {"feature_space": "raw", "objective": {"match": "per-class"}}, "main", 3),
    "lgm-dinov2-head-std-0.05-300": (DINOV2, 300, {"feature_space": "raw", "objective": {"head_std": 0.05}}, "main", 3),
    # Both backbones: the start (--init centroid picks the image most typical for both at once; one step at
    # lr 1e-9 writes it out unchanged), then the target run.
    "init-both-joint-centroid": (EFFNET, 1, {"backbone": [EFFNET, DINOV2], "lr": 1e-9}, "main", 5),
    "lgm-both-centroid-1000": (EFFNET, 1000, {"backbone": [EFFNET, DINOV2]}, "main", 5),
}


class Diag:
    def __init__(self, work: Path, data_root: str | None) -> None:
        self.work = work
        self.data_root = data_root
        self.stores = {"main": work / "fs-screen", "views4": work / "fs-v4", "whole-val": work / "fs-fullval"}
        self.cache_path = work / "eval-cache.json"
        self.cache: dict[str, Any] = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}

    def log(self, text: str) -> None:
        print(f"[diag_defaults {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def build_stores(self) -> None:
        from featurestore.build import build

        common = dict(data_root=self.data_root, image_size=IMAGE_SIZE, quiet=True)
        for backbone in EVAL_BACKBONES:
            build("fashion-mnist", backbone, self.stores["main"], splits=["train"], limit_per_class=TRAIN_PER_CLASS,
                  **common)
            build("fashion-mnist", backbone, self.stores["main"], splits=["val"], limit_per_class=VAL_PER_CLASS,
                  **common)

    def build_views(self) -> None:
        from featurestore.build import build

        build("fashion-mnist", DINOV2, self.stores["views4"], splits=["train"], limit_per_class=TRAIN_PER_CLASS,
              views=4, data_root=self.data_root, image_size=IMAGE_SIZE, quiet=True)

    def distill(self, name: str) -> Path:
        backbone, steps, options, store, _ = RUNS[name]
        out = self.work / "runs" / name
        if not run_finished(out):
            if store == "views4":
                self.build_views()
            self.log(f"distill {name}")
            distill_unless_done(out, {"store": str(self.stores[store]), "backbone": [backbone], "steps": steps,
                                      "augs": AUGS, "quiet": True, **options})
        return out

    def baseline(self, kind: str, backbone: str) -> Path:
        from engine.baselines import make_baseline

        out = self.work / "baselines" / f"{kind}-{SHORT[backbone]}"
        if not (out / "baseline.json").is_file():
            make_baseline(str(self.stores["main"]), backbone, kind, out, quiet=True)
        return out / IMAGES_DIR

    def build_whole_val(self) -> None:
        """The whole test split (10,000 images) for the three backbones: the targets' final numbers."""
        from featurestore.build import build

        for backbone in EVAL_BACKBONES:
            build("fashion-mnist", backbone, self.stores["whole-val"], splits=["val"], data_root=self.data_root,
                  image_size=IMAGE_SIZE, quiet=True)

    def evaluate(self, name: str, images: Path, seeds: int, store: str = "main") -> dict[str, float]:
        from engine.evaluate import evaluate

        key = f"{name}|seeds{seeds}" + ("" if store == "main" else f"|{store}")
        if key not in self.cache:
            self.log(f"evaluate {name} on {store}")
            result = evaluate(str(self.stores[store]), {name: str(images)}, list(EVAL_BACKBONES), seeds=seeds,
                              quiet=True)
            self.cache[key] = {SHORT[b]: round(result.rows[name][b].top1_mean, 1) for b in EVAL_BACKBONES}
            # Merge with what is on disk: another process (--only) may share --work.
            on_disk = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
            self.cache = {**on_disk, **self.cache}
            atomic_write_json(self.cache_path, self.cache)
        return {SHORT[b]: self.cache[key][SHORT[b]] for b in EVAL_BACKBONES}  # one column order


# The sets the targets are read on (the 1000-step runs with the defaults, and the real baselines),
# evaluated again on the whole test split: 10x the val images of the screening table, so +-0.5 points
# of sampling error instead of +-1.6.
TARGETS = ("lgm-effnet-centroid-1000", "lgm-dinov2-centroid-1000", "lgm-both-centroid-1000")
TARGET_SEEDS = 5
# Read beside them on the whole split: the 300-step efficientnet-lite0 sets (how transfer moves with steps;
# lgm-effnet-raw-300 is the defaults at 300 steps).
WHOLE_VAL_CONTEXT = ("lgm-effnet-raw-300", "lgm-effnet-centroid-300", "lgm-effnet-per-class-300",
                     "lgm-effnet-standardized-300", "lgm-effnet-centroid-augs10-300")


def whole_val_rows(diag: Diag, work: Path) -> list[dict[str, Any]]:
    diag.build_whole_val()
    sets = {"centroid-effnet": diag.baseline("centroid", EFFNET), "centroid-dinov2": diag.baseline("centroid", DINOV2),
            "random": diag.baseline("random", EFFNET)}
    sets.update({name: work / "runs" / name / "images" for name in TARGETS + WHOLE_VAL_CONTEXT
                 if (work / "runs" / name / "images").is_dir()})
    return [{"set": name, **diag.evaluate(name, images, TARGET_SEEDS, store="whole-val")} for name, images in sets.items()]


def pixel_stats(folder: Path) -> dict[str, float]:
    from benchmarks.diag_transfer import pixel_stats as stats
    from engine.imagefolder import read_imagefolder

    images, _, _ = read_imagefolder(folder)
    return stats(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=WORK_DIR / "diag_defaults")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these runs (see RUNS)")
    parser.add_argument("--whole-val", action="store_true", help="also evaluate the target sets (TARGETS) on the "
                        "whole test split (builds its features for the three backbones: ~25 min on 2 cores)")
    args = parser.parse_args(argv)
    if fashion_mnist_refused(args.data_root):
        return 2
    diag = Diag(args.work, args.data_root)
    diag.build_stores()
    rows = []
    for kind, backbone in (("centroid", EFFNET), ("centroid", DINOV2), ("random", EFFNET)):
        name = f"{kind}-{SHORT[backbone]}" if kind == "centroid" else "random"
        images = diag.baseline(kind, backbone)
        rows.append({"set": name, "steps": 0, "distilled on": "-", "options": "real images",
                     **diag.evaluate(name, images, 3), **pixel_stats(images)})
    for name in args.only or RUNS:
        backbone, steps, options, store, seeds = RUNS[name]
        out = diag.distill(name)
        metrics = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]
        shown = {k: v for k, v in options.items() if k != "backbone"}
        rows.append({"set": name, "steps": steps,
                     "distilled on": "+".join(SHORT[b] for b in options.get("backbone", [backbone])),
                     "options": ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in shown.items()) + (" (4-view store)" if store == "views4" else "")
                     or "defaults",
                     **diag.evaluate(name, out / IMAGES_DIR, seeds), **pixel_stats(out / IMAGES_DIR),
                     "s/step": round(metrics[-1]["seconds"] / len(metrics), 2)})
    grids = RESULTS_DIR / "diag_defaults_grids"  # the pictures, beside the numbers
    grids.mkdir(parents=True, exist_ok=True)
    for row in rows:
        source = (args.work / "runs" / row["set"] / GRID_FILE) if row["steps"] else None
        if source is not None and source.is_file():
            atomic_write_bytes(grids / f"{row['set']}.png", source.read_bytes())
            row["grid"] = f"[png](diag_defaults_grids/{row['set']}.png)"
    payload = {"rows": rows, "val_per_class": VAL_PER_CLASS, "train_per_class": TRAIN_PER_CLASS, "augs": AUGS}
    whole = whole_val_rows(diag, args.work) if args.whole_val else []
    if whole:
        payload["targets_whole_test_split"] = whole
    text = (f"Fashion-MNIST, {TRAIN_PER_CLASS} train images per class, **{VAL_PER_CLASS} val images per class** "
            f"(a small split: compare within this table only), {IMAGE_SIZE} px, ipc 1, --augs {AUGS}; top-1 % on each "
            f"backbone (3 probe seeds; 5 for the 1000-step and both-backbone runs); pixel statistics of the grey level "
            f"(near_0 / near_1: share of pixels <= 0.02 / >= 0.98); s/step with two runs side by side on 2 cores.\n\n"
            + markdown_table(rows, list(dict.fromkeys(k for row in rows for k in row)))
            + (f"\n\n## The target sets on the whole test split (10,000 images, {TARGET_SEEDS} probe seeds)\n\n"
               + markdown_table(whole) if whole else ""))
    write_results("diag_defaults", payload, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
