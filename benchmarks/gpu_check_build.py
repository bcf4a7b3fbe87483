"""gpu_check's build part: `fs build` throughput against the bare backbone forward, both on the device."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.gpu_check_context import Context


def part_build(ctx: Context) -> dict[str, Any]:
    import shutil

    import torch

    from benchmarks.bench_build import write_jpeg_folder
    from featurestore.augment import center_crop
    from featurestore.backbones import create_backbone
    from featurestore.build import _default_workers, build
    from featurestore.datasets import canonical_image, open_dataset

    if ctx.dry:
        backbone_name, size, per_class, batch, repeats, workers = "efficientnet-lite0", 112, 4, 16, 1, 1
    else:
        backbone_name, size, per_class, batch, repeats, workers = "efficientnet-lite0", 224, 200, 256, 2, None
    workers = _default_workers() if workers is None else workers
    root = ctx.work / "jpeg"
    n, source = write_jpeg_folder(root, per_class, None)
    model = create_backbone(backbone_name, image_size=size, device=ctx.device)
    ds = open_dataset("imagefolder", root=root, split="train")
    canon = torch.stack([canonical_image(ds.load_image(i), model.resize_size) for i in range(len(ds))])
    if ctx.device == "cuda":
        canon = canon.pin_memory()

    def bare() -> float:
        ctx.sync()
        start = time.perf_counter()
        for lo in range(0, len(canon), batch):
            model.embed(center_crop(canon[lo:lo + batch], model.image_size)).to(torch.float16)
        ctx.sync()
        return len(canon) / (time.perf_counter() - start)

    def built() -> float:
        store = ctx.work / "bench-store"
        shutil.rmtree(store, ignore_errors=True)
        start = time.perf_counter()
        report = build("imagefolder", backbone_name, str(store / "fs"), data_root=str(root), image_size=size,
                       batch_size=batch, workers=workers, device=ctx.device, quiet=True)
        ctx.sync()
        rate = report.splits[0].rows / (time.perf_counter() - start)
        shutil.rmtree(store, ignore_errors=True)
        return rate

    bare()  # warm-up (cuDNN / oneDNN, allocator)
    bare_rates, build_rates = [], []
    for _ in range(repeats):
        bare_rates.append(bare())
        build_rates.append(built())
    rate, ceiling = max(build_rates), max(bare_rates)
    return {"status": "passed", "backbone": backbone_name, "image_size": size, "images": n, "source": source,
            "batch_size": batch, "workers": workers, "build_img_s": round(rate, 1), "bare_forward_img_s": round(ceiling, 1),
            "ratio": round(rate / ceiling, 3),
            "note": "bare = backbone.embed on pre-decoded canonical images (pinned host memory) on the same device; "
                    "build = a complete `fs build` (listing, JPEG decode in workers, forward, Zarr writes, "
                    "statistics, model loading and worker start-up included), best of the repeats"}
