"""`fs build` throughput vs the bare backbone forward on pre-decoded tensors, in one run.

Same model, batch size and resolution on both sides. The images are real JPEG files in an ImageFolder
tree (Fashion-MNIST train images by default, written once into a temp folder), so `fs build` pays for
everything a user's build pays for: listing, JPEG decode, the canonical resize/crop in DataLoader
workers, the forward pass, the fp16 cast, Zarr writes and the per-unit statistics. The bare side runs
only `backbone(center_crop(canonical))` on tensors already in memory. Target: ratio >= 0.85.

    python -m benchmarks.bench_build                      # efficientnet-lite0, 112 px, 2000 JPEGs
    python -m benchmarks.bench_build --source-size 256    # heavier decode (larger JPEGs)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks.common import machine_info, markdown_table, write_results
from featurestore.augment import center_crop
from featurestore.backbones import create_backbone
from featurestore.build import _default_workers, build
from featurestore.datasets import canonical_image, open_dataset


def write_jpeg_folder(root: Path, per_class: int, source_size: int | None) -> tuple[int, str]:
    """Fashion-MNIST train images (generated gratings if it is not installed) as root/train/<class>/*.jpg."""
    try:
        ds = open_dataset("fashion-mnist", split="train", limit_per_class=per_class)
    except Exception:  # noqa: BLE001 - any reason the IDX files are unusable: fall back to generated images
        ds = open_dataset("gratings", split="train", limit_per_class=per_class)
    for i in range(len(ds)):
        image = ds.load_image(i)
        if source_size:
            image = image.resize((source_size, source_size), Image.BICUBIC)
        folder = root / "train" / f"class{int(ds.labels[i]):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return len(ds), ds.name


class BareForward:
    """backbone(center_crop(x)) on canonical tensors decoded beforehand: the ceiling for `fs build`."""

    def __init__(self, backbone_name: str, image_size: int, files_root: Path, batch_size: int) -> None:
        self.model = create_backbone(backbone_name, image_size=image_size)
        ds = open_dataset("imagefolder", root=files_root, split="train")
        self.canon = torch.stack([canonical_image(ds.load_image(i), self.model.resize_size) for i in range(len(ds))])
        self.batch_size = batch_size
        with torch.inference_mode():  # warm-up (allocator, oneDNN primitives)
            self.model(center_crop(self.canon[:batch_size], self.model.image_size))

    def rate(self) -> float:
        """Images/s of one pass over all images (the fp16 cast included, as in the store)."""
        start = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, len(self.canon), self.batch_size):
                batch = center_crop(self.canon[lo:lo + self.batch_size], self.model.image_size)
                self.model(batch).to(torch.float16)
        return len(self.canon) / (time.perf_counter() - start)


def build_rate(backbone_name: str, image_size: int, files_root: Path, batch_size: int, workers: int) -> float:
    """Images/s of a complete `fs build` into a fresh store (model loading and worker start-up included)."""
    store = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        start = time.perf_counter()
        report = build("imagefolder", backbone_name, store / "fs", data_root=files_root, image_size=image_size,
                       batch_size=batch_size, workers=workers, quiet=True)
        return report.splits[0].rows / (time.perf_counter() - start)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--per-class", type=int, default=200, help="images per class (10 classes)")
    parser.add_argument("--source-size", type=int, default=None,
                        help="resize the JPEGs to this many px before saving (default: native size, 28 px for Fashion-MNIST)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="*", default=None,
                        help="DataLoader worker counts to measure (default: the build default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="bench_build")
    args = parser.parse_args()

    worker_counts = args.workers or [_default_workers()]
    with tempfile.TemporaryDirectory(prefix="bench-jpeg-") as tmp:
        root = Path(tmp)
        n, source = write_jpeg_folder(root, args.per_class, args.source_size)
        bare_forward = BareForward(args.backbone, args.image_size, root, args.batch_size)
        # Interleave the measurements (bare, then each build, per repeat) and keep the best of each, so
        # load from other processes on a shared machine hits both sides alike.
        bare_rates: list[float] = []
        build_rates: dict[int, list[float]] = {w: [] for w in worker_counts}
        for repeat in range(args.repeats):
            bare_rates.append(bare_forward.rate())
            for workers in worker_counts:
                build_rates[workers].append(
                    build_rate(args.backbone, args.image_size, root, args.batch_size, workers))
                print(f"repeat {repeat}: workers={workers}: fs build {build_rates[workers][-1]:.1f} img/s, "
                      f"bare forward {bare_rates[-1]:.1f} img/s", flush=True)
        bare = max(bare_rates)
        rows = []
        for workers in worker_counts:
            rate = max(build_rates[workers])
            rows.append({"workers": workers, "build_img_s": rate, "bare_forward_img_s": bare,
                         "ratio": rate / bare, "target": 0.85, "meets_target": rate / bare >= 0.85})
    load = os.getloadavg()[0]
    config = {"backbone": args.backbone, "image_size": args.image_size, "images": n,
              "source": f"{source} train images as JPEG files ({args.source_size or 'native'} px)",
              "batch_size": args.batch_size, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
              "load_average_1min_at_end": round(load, 2)}
    payload = {"config": config, "results": rows, "machine": machine_info()}
    md = (f"`fs build` vs bare forward on pre-decoded tensors: {args.backbone} at {args.image_size} px, "
          f"batch {args.batch_size}, {n} JPEG files ({config['source']}); best of {args.repeats} interleaved "
          f"runs; 1-min load average at the end {load:.1f} on {os.cpu_count()} cores.\n\n"
          + markdown_table(rows))
    json_path, md_path = write_results(args.name, payload, md)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
