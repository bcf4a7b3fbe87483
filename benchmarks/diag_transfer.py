"""Diagnostic (issue 19): why distilled sets fail on the ViT and on backbones they were not made on.

Measurements that need no distillation, on the quality bench's Fashion-MNIST stores:

- **agreement**: how much two backbones' feature spaces agree, on the stored val features (centre crops):
  mutual k-nearest-neighbour overlap (for each val image, the fraction of its k nearest neighbours in one
  space that are also among its k nearest in the other; 0 = unrelated spaces, 1 = the same neighbourhoods;
  chance level is k / N), beside each space's own k-NN top-1, so that a pair that cannot transfer is told
  apart from a method that does not;
- **headroom**: what a 10-image training set can reach on each backbone: the probe trained on the 10
  exact class-mean features (the authors' probe recipe, no augmentation; the best one image per class
  could do if its features were the class mean), against the full-data probe, centroid and random real
  images; and, for DINOv2, the same at 112 px and at 224 px (ViT-S/14 sees 8x8 tokens at 112 px; it was
  trained at 224) on two small stores with the same images (200 train, 100 val images per class);
- **pixels**: pixel statistics (mean, std, share of pixels near 0 and near 1, mean per-image contrast) of the
  real data and of each image set given with --set NAME=DIR (distilled sets, baselines).

    python -m benchmarks.diag_transfer                      # agreement + headroom at 112 px + data pixels
    python -m benchmarks.diag_transfer --resolution 224     # adds DINOv2 at 112 vs 224 px (~10 min of builds)
    python -m benchmarks.diag_transfer --set lgm=DIR/images # pixel statistics of a set

The feature spaces are read from diag_defaults' store (500 train, 100 val images per class: built there
if missing, so both diagnostics share it).

Results: benchmarks/results/diag_transfer.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import WORK_DIR, markdown_table, write_results
from benchmarks.harness import fashion_mnist_refused

BACKBONES = ("efficientnet-lite0", "dinov2-vits14-imgfocus", "opennsfw-resnet50")
VIT = "dinov2-vits14-imgfocus"
SHORT = {"efficientnet-lite0": "effnet", "dinov2-vits14-imgfocus": "dinov2", "opennsfw-resnet50": "nsfw-r50"}
K = 10
SEEDS = 5
RESOLUTION_TRAIN_PER_CLASS = 200  # the two resolution stores: small, the same images at 112 and 224 px
RESOLUTION_VAL_PER_CLASS = 100
NEAR = 0.02  # a pixel "near 0" is <= NEAR, "near 1" >= 1 - NEAR


def knn(features: torch.Tensor, k: int, block: int = 2048) -> torch.Tensor:
    """Indices [N, k] of each row's k nearest other rows by cosine similarity."""
    x = torch.nn.functional.normalize(features.float(), dim=1)
    out = []
    for start in range(0, x.shape[0], block):
        sim = x[start:start + block] @ x.T
        sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = -2.0  # not itself
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def mutual_knn(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of |kNN_a(i) ∩ kNN_b(i)| / k."""
    hits = (a[:, :, None] == b[:, None, :]).any(dim=2).float().sum(dim=1)
    return float(hits.mean() / a.shape[1])


def agreement(store_path: Path) -> dict[str, Any]:
    from featurestore.store import FeatureStore

    store = FeatureStore.open(store_path)
    neighbours, labels, own = {}, None, {}
    for backbone in BACKBONES:
        val = store.split(backbone, "val").load(view=0)
        labels = val.labels
        neighbours[backbone] = knn(val.features, K)
        votes = labels[neighbours[backbone]]
        pred = torch.mode(votes, dim=1).values
        own[SHORT[backbone]] = round(float((pred == labels).float().mean() * 100), 1)
    pairs = {}
    for i, a in enumerate(BACKBONES):
        for b in BACKBONES[i + 1:]:
            pairs[f"{SHORT[a]}-{SHORT[b]}"] = round(mutual_knn(neighbours[a], neighbours[b]), 3)
    return {"k": K, "val_rows": int(labels.shape[0]), "chance": round(K / int(labels.shape[0]), 4),
            "knn_top1": own, "mutual_knn": pairs}


def headroom(store_path: Path, backbone: str) -> dict[str, Any]:
    """Full-data probe and the 10-class-mean-features probe on one store's backbone."""
    from engine.evaluate import evaluate_full
    from engine.probe import ProbeRecipe, probes_accuracy, train_probes
    from featurestore.store import FeatureStore

    store = FeatureStore.open(store_path)
    train = store.split(backbone, "train").load(view=0)
    val = store.split(backbone, "val").load(view=0)
    means = torch.stack([train.features[train.labels == c].float().mean(0) for c in range(store.num_classes)])
    gens = [torch.Generator().manual_seed(s) for s in range(SEEDS)]
    probes = train_probes(means, torch.arange(store.num_classes), store.num_classes, ProbeRecipe(), gens)
    mean_acc = [a for a, _ in probes_accuracy(probes, val.features.float(), val.labels)]
    full = evaluate_full(str(store_path), backbone, seeds=SEEDS, quiet=True)
    return {"class_mean_probe": round(float(np.mean(mean_acc)), 1), "class_mean_probe_std": round(float(np.std(mean_acc)), 1),
            "full_probe": round(full.top1_mean, 1), "val_rows": int(val.labels.shape[0]),
            "image_size": store.split(backbone, "train").image_size}


def baseline_accuracy(store_path: Path, backbone: str, work: Path) -> dict[str, float]:
    """Centroid and random real images, evaluated with the protocol on the store's own val split."""
    from engine.baselines import make_baseline
    from engine.evaluate import evaluate
    from engine.distill.outdir import IMAGES_DIR

    out = {}
    for kind in ("centroid", "random"):
        folder = work / f"{kind}-{SHORT[backbone]}-{store_path.name}"
        if not (folder / "baseline.json").is_file():
            make_baseline(str(store_path), backbone, kind, folder, quiet=True)
        result = evaluate(str(store_path), {kind: str(folder / IMAGES_DIR)}, [backbone], seeds=SEEDS, quiet=True)
        out[kind] = round(result.rows[kind][backbone].top1_mean, 1)
    return out


def build_resolution_store(store_path: Path, size: int, data_root: str | None) -> float:
    import time

    from featurestore.build import build

    started = time.perf_counter()
    common = dict(data_root=data_root, image_size=size, quiet=True)
    build("fashion-mnist", VIT, store_path, splits=["train"], limit_per_class=RESOLUTION_TRAIN_PER_CLASS, **common)
    build("fashion-mnist", VIT, store_path, splits=["val"], limit_per_class=RESOLUTION_VAL_PER_CLASS, **common)
    return round(time.perf_counter() - started, 1)


def pixel_stats(images: torch.Tensor) -> dict[str, float]:
    """images: [N, 3, H, W] in [0, 1]."""
    grey = images.float().mean(dim=1)
    return {"mean": round(float(grey.mean()), 3), "std": round(float(grey.std()), 3),
            "near_0": round(float((grey <= NEAR).float().mean()), 3),
            "near_1": round(float((grey >= 1 - NEAR).float().mean()), 3),
            "contrast": round(float(grey.flatten(1).std(dim=1).mean()), 3)}


def data_pixels(data_root: str | None, per_class: int = 50) -> dict[str, float]:
    from featurestore.datasets import canonical_image, open_dataset

    dataset = open_dataset("fashion-mnist", data_root, "train", limit_per_class=per_class)
    images = torch.stack([canonical_image(dataset.load_image(i), 128) for i in range(len(dataset))])
    return pixel_stats(images)


def set_pixels(folder: str) -> dict[str, float]:
    from engine.imagefolder import read_imagefolder

    images, _, _ = read_imagefolder(folder)
    return pixel_stats(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=WORK_DIR / "diag_defaults",
                        help="diag_defaults' work folder: its store, and the stores and baselines made here")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--resolution", type=int, action="append", default=[], help="also 224: DINOv2 headroom there")
    parser.add_argument("--set", action="append", default=[], help="NAME=DIR: pixel statistics of an image set")
    args = parser.parse_args(argv)
    if fashion_mnist_refused(args.data_root):
        return 2
    from benchmarks.diag_defaults import Diag

    diag = Diag(args.work, args.data_root)
    diag.build_stores()
    store = diag.stores["main"]
    results: dict[str, Any] = {"agreement": agreement(store), "headroom": {}, "pixels": {}}
    for backbone in BACKBONES:
        row = headroom(store, backbone)
        row.update(baseline_accuracy(store, backbone, args.work / "diag_transfer"))
        results["headroom"][f"{SHORT[backbone]} @112 (500 train/class)"] = row
    for size in sorted({112, *args.resolution}) if args.resolution else ():
        path = args.work / f"fs-{SHORT[VIT]}-{size}-small"
        results.setdefault("build_seconds", {})[f"{SHORT[VIT]} @{size}"] = build_resolution_store(path, size,
                                                                                                 args.data_root)
        row = headroom(path, VIT)
        row.update(baseline_accuracy(path, VIT, args.work / "diag_transfer"))
        results["headroom"][f"{SHORT[VIT]} @{size} (200 train/class)"] = row
    results["pixels"]["real data (500 train images)"] = data_pixels(args.data_root)
    for item in args.set:
        name, _, folder = item.partition("=")
        results["pixels"][name] = set_pixels(folder)
    write_results("diag_transfer", results, render(results))
    print(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    agree = results["agreement"]
    text = [f"Fashion-MNIST, stored val features (centre crops, {agree['val_rows']} images), k = {agree['k']} "
            f"(chance {agree['chance']}).\n",
            "### Agreement of the feature spaces (mutual k-NN overlap)\n",
            markdown_table([{"pair": k, "mutual k-NN": v} for k, v in agree["mutual_knn"].items()]),
            "\nOwn k-NN top-1 (%): " + ", ".join(f"{k} {v}" for k, v in agree["knn_top1"].items()) + "\n",
            "### Headroom: what 10 training images can reach (top-1 %, 5 probe seeds)\n",
            "`class_mean_probe`: the authors' probe trained on the 10 exact class-mean train features (no "
            "augmentation); centroid / random: real images, evaluated with the protocol.\n",
            markdown_table([{"backbone @ px": k, **v} for k, v in results["headroom"].items()])]
    if results.get("build_seconds"):
        text.append("\nBuild seconds: " + ", ".join(f"{k} {v}" for k, v in results["build_seconds"].items()) + "\n")
    text += ["\n### Pixel statistics (grey level in [0, 1])\n",
             markdown_table([{"set": k, **v} for k, v in results["pixels"].items()])]
    return "\n".join(text)


if __name__ == "__main__":
    sys.exit(main())
