"""bench_quality's plan: the sets it distills (the curve, the ablations, the transfer runs), in the order the
targets need them, and the settings every run shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.common import FASHION_MNIST_IMAGE_SIZE, FASHION_MNIST_TRAIN_PER_CLASS

DISTILL_BACKBONES = ("efficientnet-lite0", "dinov2-vits14-imgfocus")
HELD_OUT = "opennsfw-resnet50"
EVAL_BACKBONES = (*DISTILL_BACKBONES, HELD_OUT)
SHORT = {"efficientnet-lite0": "effnet", "dinov2-vits14-imgfocus": "dinov2", HELD_OUT: "nsfw-r50"}
IMAGE_SIZE = FASHION_MNIST_IMAGE_SIZE
TRAIN_PER_CLASS = FASHION_MNIST_TRAIN_PER_CLASS
AUGS = 2
SEEDS = 5
ABLATION_STEPS = 400
# Stores of augmented real views (issue 14: views 1 / 4 / 10 against accuracy and build time); the 1-view one
# only times the build (its distillation is the curve's lgm-effnet-400, on the main store).
STORE_VIEWS = (1, 4, 10)
TRANSFER_STEPS = 1000


@dataclass
class Run:
    """One distillation: its name, its options beyond the defaults, and which curve/table it belongs to."""

    name: str
    options: dict[str, Any]
    group: str
    store: str = "main"


# Steps of the curve per (distillation backbone, objective): every budget on the cheap CNN, fewer on the ViT
# (about 1.4x the step time here); 1000 steps everywhere, the budget the targets are read at.
CURVE = {("efficientnet-lite0", "lgm"): (200, 400, 1000, 2000), ("efficientnet-lite0", "clp"): (200, 400, 1000),
         ("dinov2-vits14-imgfocus", "lgm"): (200, 400, 1000), ("dinov2-vits14-imgfocus", "clp"): (400, 1000)}
QUICK_CURVE = {("efficientnet-lite0", "lgm"): (200, 400), ("efficientnet-lite0", "clp"): (400,)}


def plan(quick: bool) -> list[Run]:
    """Every run, in the order the targets need them: the sets the targets are read at and the base of the
    ablations first, then the ablations, then the rest of the curve. Results are written after every run, so
    a bench stopped early (or given less time) leaves the most useful part measured."""
    curve = {f"{objective}-{SHORT[backbone]}-{n}": Run(f"{objective}-{SHORT[backbone]}-{n}",
                                                       {"backbone": [backbone], "method": objective, "steps": n},
                                                       "curve")
             for (backbone, objective), steps in (QUICK_CURVE if quick else CURVE).items() for n in steps}
    if quick:
        return list(curve.values())
    # One change each against lgm-effnet-400 (the curve's run), evaluated on every backbone: the fixes of
    # issue 14 reverted, and the choices issue 12 asks about for transfer (pyramid, colour decorrelation,
    # augmentation of either side).
    base = {"backbone": [DISTILL_BACKBONES[0]], "steps": ABLATION_STEPS}
    ablations = [
        Run("abl-real-batch-authors", {**base, "real_batch": AUGS * 10}, "ablation"),   # ipc * augs * C
        Run("abl-init-noise", {**base, "init": "noise"}, "ablation"),   # the authors' default init
        Run("abl-param-pixels", {**base, "param": "pixels"}, "ablation"),
        Run("abl-real-views4", {**base}, "ablation", store="views4"),
        Run("abl-no-augmentation", {**base, "augment": False}, "ablation"),
        Run("abl-colour-rgb", {**base, "colour": "rgb"}, "ablation"),
        Run("abl-no-decorrelation", {**base, "colour": "rgb", "decorrelate": False}, "ablation"),
        # Issue 14's schedule fix reverted as far as it can be: the old fixed 200 steps per level ends a
        # 400-step run at 2 px and is refused now; 50 steps per level reaches full resolution at step 350.
        Run("abl-grow-every-50", {**base, "grow_every": 50}, "ablation"),
        Run("abl-real-views10", {**base}, "ablation", store="views10"),
    ]
    first = [curve.pop(name) for name in ("lgm-effnet-400", "lgm-effnet-1000", "clp-effnet-400", "lgm-dinov2-400")]
    # Both backbones at once, at the ablation budget beside the two single-backbone 400-step sets (cheap
    # enough to come early), and at the budget the targets are read at.
    both = [Run(f"both-{n}", {"backbone": list(DISTILL_BACKBONES), "steps": n}, "transfer")
            for n in (ABLATION_STEPS, TRANSFER_STEPS)]
    at_1000 = [curve.pop(f"{m}-{b}-1000") for m, b in (("clp", "effnet"), ("lgm", "dinov2"), ("clp", "dinov2"))]
    return (first + both[:1] + ablations[:3] + [curve.pop("clp-dinov2-400"), curve.pop("lgm-effnet-200")] + at_1000
            + both[1:] + ablations[3:] + list(curve.values()))
