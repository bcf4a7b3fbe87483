"""Diagnostic (issue 19): along one constant-rate run, the set's fit to its own backbone's train features
against its accuracy on DINOv2 — the measurement behind `--lr-schedule plateau`.

efficientnet-lite0's set, distilled at the authors' constant 2e-3 from the centroid images, snapshotted every
50 steps (the run is extended 50 steps at a time with --resume; each extension continues the same
trajectory). At each snapshot:
- `fit`: what `--lr-schedule plateau` reads (engine.evaluate.set_fit): probes trained with the protocol's
  recipe (1000 epochs, 10 cached views, 3 seeds) on the images, their cross-entropy and top-1 on the
  store's 5000 train features of the same backbone;
- `quick top-1`: the same images through `--eval-every`'s quick probe (engine.probe.QUICK_PROBE: 1 seed,
  10 views, 1000 epochs; 300 until 2026-12-07), scored on those train features: what a cheaper signal
  would have read (measured afresh every run, the rest is cached);
- every 100 steps, the authors' protocol (5 seeds, 100 views, 1000 epochs) on the whole test split of
  efficientnet-lite0 and DINOv2.

Fashion-MNIST, 500 train images per class, 112 px, ipc 1, `--augs 2`; the stores of benchmarks.diag_defaults.

    python -m benchmarks.diag_fit_curve          # ~50 min on 2 CPU cores (cached: a rerun continues)

Results: benchmarks/results/diag_fit_curve.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import WORK_DIR, markdown_table, write_results
from benchmarks.diag_defaults import AUGS, DINOV2, EFFNET, IMAGE_SIZE, SHORT, TRAIN_PER_CLASS
from benchmarks.diag_lr_schedule import Diag
from benchmarks.harness import fashion_mnist_refused
from engine.distill.outdir import CHECKPOINT_FILE, DISTILLED_FILE
from engine.probe import QUICK_PROBE
from featurestore.runtime import atomic_write_json

STEPS, EVERY, FULL_EVERY, SEEDS = 1000, 50, 100, 5


def snapshots(diag: Diag) -> dict[int, Path]:
    """The run's images after every EVERY steps (distilled.safetensors copies), made unless there."""
    from engine.distill import DistillConfig, distill

    out, snaps = diag.work / "runs" / "fit-curve-effnet", diag.work / "fit-curve-snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    paths = {}
    for step in range(EVERY, STEPS + 1, EVERY):
        paths[step] = snaps / f"step{step}.safetensors"
        if paths[step].is_file():
            continue
        diag.log(f"distill to step {step}")
        distill(DistillConfig(store=str(diag.train_store), out=str(out), backbone=[EFFNET], steps=step, augs=AUGS,
                              lr_schedule="constant", quiet=True, resume=(out / CHECKPOINT_FILE).is_file()))
        shutil.copyfile(out / DISTILLED_FILE, paths[step])
    return paths


def measure(diag: Diag, step: int, path: Path, cache: dict[str, Any], store, train, model) -> dict[str, Any]:
    """The snapshot's row: the fit and the protocol cached by step; the quick probe (a few seconds) measured
    every time, so that it is always the current recipe's. `store`, `train`, `model`: the train store,
    efficientnet-lite0's stored train features and the backbone, opened once by the caller."""
    from safetensors.torch import load_file

    from engine.evaluate import quick_probe, set_fit

    key = str(step)
    diag.log(f"measure step {step}")
    tensors = load_file(path)
    images, labels = tensors["images"], tensors["labels"]
    if key not in cache:
        loss, top1 = set_fit(model, images, labels, train.features, train.labels, 10)
        row: dict[str, Any] = {"step": step, "fit loss": round(loss, 4), "fit top-1": round(top1, 2)}
        if step % FULL_EVERY == 0:
            row.update(protocol_top1(diag, path, images, labels, store.class_names))
        cache[key] = row
    quick = quick_probe(model, images, labels, train.features, train.labels, 10)
    return {**cache[key], "quick top-1": round(quick, 2)}


def protocol_top1(diag: Diag, path: Path, images, labels, class_names: list[str]) -> dict[str, float]:
    """The authors' protocol on the whole test split of both backbones, on the snapshot written as the PNG
    ImageFolder every evaluated run is (engine.outputs.write_imagefolder)."""
    from engine.evaluate import evaluate
    from engine.imagefolder import write_imagefolder

    folder = path.with_suffix("")
    write_imagefolder(folder, images, labels, class_names)
    result = evaluate(str(diag.val_store), {folder.name: str(folder)}, [EFFNET, DINOV2], seeds=SEEDS, quiet=True)
    return {SHORT[b]: round(result.rows[folder.name][b].top1_mean, 1) for b in (EFFNET, DINOV2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=WORK_DIR / "diag_defaults")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if fashion_mnist_refused(args.data_root):
        return 2
    diag = Diag(args.work, args.data_root)
    diag.name = "diag_fit_curve"
    diag.build_stores()
    cache_path = args.work / "fit-curve-cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    import torch

    from featurestore.store import open_store

    store = open_store(str(diag.train_store))
    split = store.split(EFFNET, "train")
    train, model = split.load(view=0), split.open_backbone(torch.device("cpu"))
    rows = []
    for step, path in snapshots(diag).items():
        rows.append(measure(diag, step, path, cache, store, train, model))
        atomic_write_json(cache_path, cache)
    start = {"step": 0, **diag.evaluate("centroid-effnet", diag.baseline("centroid", EFFNET))}
    text = (f"Fashion-MNIST, {TRAIN_PER_CLASS} train images per class, {IMAGE_SIZE} px, ipc 1, --augs {AUGS}; "
            f"efficientnet-lite0's set at a constant 2e-3 from the centroid images (step 0: "
            f"{start['effnet']} / {start['dinov2']} on the whole test split). fit: engine.evaluate.set_fit on the "
            f"5000 stored train features (what --lr-schedule plateau reads); quick: --eval-every's probe "
            f"({QUICK_PROBE}) on the same features; effnet / dinov2: the protocol ({SEEDS} seeds) on the whole test split.\n\n"
            + markdown_table(rows, ["step", "fit loss", "fit top-1", "quick top-1", SHORT[EFFNET], SHORT[DINOV2]]))
    write_results("diag_fit_curve", {"rows": rows, "start": start}, text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
