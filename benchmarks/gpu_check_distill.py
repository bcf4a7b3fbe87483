"""gpu_check's distill-steps part: LGM steps with a random-weight DINOv2 ViT-B/14, store mode against
end-to-end mode, timed through the step `engine distill` ships (engine.distill.loop.step)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.gpu_check_context import Context


def _random_vit(size: int, device: str):
    """A random-weight DINOv2 ViT-B/14 wrapped as a `Backbone` (the registered one needs hub weights)."""
    import dataclasses

    import timm

    from featurestore.backbones import Backbone, get_spec

    spec = dataclasses.replace(get_spec("dinov2-vitb14"), name="dinov2-vitb14-random", aliases=(),
                               weights="random init (gpu_check)", hub_id=None)
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=0, img_size=size)
    resize = round(size * spec.resize_size / spec.image_size)
    return Backbone(spec, model, model, image_size=size, resize_size=resize, weights_path=None).to(device)


class _NoiseImages:
    """Deterministic random RGB images (a stand-in dataset: ImageRealSource only calls load_image)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def load_image(self, index: int):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(index)
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))


def _real_source(mode: str, backbone, c: int, n_store: int, authors_batch: int, device: str):
    """The real side of `distill_mode` and the line saying what it takes per step."""
    import torch

    from engine.real import ImageRealSource, StoreRealSource, plan_real_batch

    if mode == "store":
        gen = torch.Generator().manual_seed(1)
        features = torch.randn(n_store, backbone.dim, generator=gen).half()   # as stored (fp16)
        labels = torch.randint(0, c, (n_store,), generator=gen)
        batch, real_batch_note = plan_real_batch("auto", n_store, c, backbone.dim, authors_batch,
                                                 torch.device(device).type)
        real = StoreRealSource(features, labels, batch=batch, device=device)
    else:
        # The authors' real batch: ipc * augs * C images, each augmented and pushed through the backbone every
        # step. Exactly that many rows, so every row is used every step and the decoded canonical images fit
        # the source's in-memory cache: decoding happens in the warm-up step only.
        rows = torch.arange(authors_batch)
        labels = rows % c
        real = ImageRealSource(_NoiseImages(backbone.resize_size), rows, labels, backbone, batch=authors_batch,
                               augment_images=True, cache_bytes=authors_batch * 3 * backbone.resize_size ** 2 * 4)
        real_batch_note = f"end to end: {authors_batch} real images augmented and embedded per step (decoded once, cached)"
    return real, real_batch_note


def distill_mode(mode: str, backbone, c: int, ipc: int, augs: int, n_store: int, warmup: int, steps: int,
                 ctx: Context) -> dict[str, Any]:
    """`steps` timed LGM steps (after `warmup`): engine.distill.loop.step, the step `engine distill` runs,
    then its update (Run.optimizer_step, which runs the back-propagation in a single process)."""
    import math

    import torch

    from engine.distill.backprop import SyntheticSide, resolve_copies_per_pass
    from engine.distill.loop import step
    from engine.distill.members import Member
    from engine.distill.memory import peak_memory_mb, reset_peak_memory
    from engine.distill.run import stepping_run
    from engine.distill.seeds import make_generators
    from engine.objectives import get_objective
    from engine.parameterizations import make_synthetic
    from featurestore.augment import AugmentConfig
    from featurestore.distributed import destroy, init_process_group_from_env

    device = ctx.device
    if device == "cuda":
        torch.cuda.empty_cache()
        reset_peak_memory(torch.device(device))
    gens = make_generators(0)
    real, real_batch_note = _real_source(mode, backbone, c, n_store, ipc * augs * c, device)
    synthetic = make_synthetic("pyramid", c, ipc, backbone.resize_size, init="noise", grow_every=10_000,
                               generator=gens["init"], device=device)
    side = SyntheticSide(backbone, augs, True, AugmentConfig())
    copies = side.copies(synthetic.n)
    per_pass, pass_info = resolve_copies_per_pass("auto", side, synthetic, copies)
    member = Member(split=None, backbone=backbone, real=real, side=side, weight=1.0, copies_per_pass=per_pass,
                    pass_info=pass_info, real_batch_note=real_batch_note)
    dist_ctx = init_process_group_from_env(device)
    try:
        run = stepping_run(dist_ctx, [member], get_objective("lgm", c), synthetic, gens, lr=2e-3)
        times, losses = [], []
        for index in range(warmup + steps):
            ctx.sync()
            start = time.perf_counter()
            loss, _, _, pending = step(run, index, [False])
            run.optimizer_step(index, pending)
            ctx.sync()
            if index >= warmup:
                times.append(time.perf_counter() - start)
            losses.append(loss)
    finally:
        destroy(dist_ctx)
    return {"mode": mode, "s_per_step": statistics.median(times), "steps_timed": len(times),
            "peak_memory_gib": round(peak_memory_mb(torch.device(device)) / 1024, 3),
            "peak_memory_how": "torch.cuda.max_memory_allocated" if device == "cuda" else "VmHWM of the part's process",
            "copies_per_step": copies, "copies_per_pass": per_pass, "chunk": pass_info.get("chunk"),
            "real_rows_per_step": real.num_rows if real.batch is None else min(real.batch, real.num_rows),
            "real_plan": real_batch_note,
            "losses_finite": all(math.isfinite(v) for v in losses), "last_loss": round(losses[-1], 5)}


def part_distill_steps(ctx: Context) -> dict[str, Any]:
    import torch

    if ctx.dry:
        size, c, ipc, augs, n_store, warmup, steps = 28, 4, 1, 2, 256, 1, 2
    else:
        size, c, ipc, augs, n_store, warmup, steps = 224, 100, 1, 10, 10_000, 1, 3
    torch.manual_seed(0)
    backbone = _random_vit(size, ctx.device)
    results = [distill_mode(mode, backbone, c, ipc, augs, n_store, warmup, steps, ctx) for mode in ("store", "end-to-end")]
    setup = {"backbone": "timm vit_base_patch14_dinov2 (random weights)", "image_size": size, "C": c, "ipc": ipc,
             "augs": augs, "store_rows": n_store, "precision": "bf16 autocast" if ctx.device == "cuda" else "fp32"}
    store, e2e = results
    out = {"setup": setup, "modes": results,
           "e2e_over_store_time": e2e["s_per_step"] / store["s_per_step"],
           "e2e_over_store_memory": e2e["peak_memory_gib"] / max(store["peak_memory_gib"], 1e-9)}
    bad = [r["mode"] for r in results if not r["losses_finite"]]
    if bad:
        return {"status": "failed", "reason": f"non-finite loss in mode(s) {', '.join(bad)}", **out}
    return {"status": "passed", **out}
