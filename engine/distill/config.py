"""`DistillConfig`: every option of `engine distill`, written once (the CLI derives its options from the
fields), its validation, and the errors a run reports."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from engine.objectives import OBJECTIVE_NAMES, OBJECTIVES, objective_config
from engine.probe import QUICK_PROBE
from featurestore.errors import UserError
from featurestore.options import option

PARAMETERIZATIONS = ("pyramid", "pixels")
COLOURS = ("auto", "rgb", "grey")
INITS = ("noise", "zero", "real", "centroid")
# Inits that start from real images of each class (the pyramid then starts complete: no growth schedule).
REAL_INITS = ("real", "centroid")
REAL_SOURCES = ("store", "images")
FEATURE_SPACES = ("raw", "standardized")
LR_SCHEDULES = ("constant", "cosine", "plateau")


class DistillError(UserError):
    """A distillation run cannot start or continue (bad options, incompatible store or checkpoint)."""


class NonFiniteLossError(DistillError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


@dataclass
class DistillConfig:
    """Every option of `engine distill` (defaults: the authors' LGM hyper-parameters). `objective` holds
    the options of the objective `method` names that were given (see `engine.objectives`; absent ones take its
    defaults)."""

    store: str = option(help="Feature store directory (from `fs build`).")
    out: str = option(help="Output directory (must be new or empty, unless --resume).")
    backbone: list[str] = option(help="Backbone whose stored features give the real side; repeat it to distill "
                                      "one set against several backbones at once.", factory=list)
    backbone_weight: list[float] = option(help="Weight of each --backbone's loss in the mean (default: equal), "
                                               "one per --backbone.", factory=list)
    method: str = option("lgm", "Objective: " + " or ".join(f"{spec.name} ({spec.description})"
                                                            for spec in OBJECTIVES.values()) + ".")
    ipc: int = option(1, "Synthetic images per class.")
    steps: int = option(5000, "Optimization steps.")
    lr: float | str = option("auto", "Adam learning rate of the image parameters, or auto: from real images "
                                     "(--init centroid or real) the authors' 2e-3 at any budget; from grey or noise "
                                     "10 / --steps, at most 0.05 (the authors' 2e-3 at their 5000 steps: the same "
                                     "total movement at any budget).")
    lr_schedule: str = option("plateau", "How the rate changes over --steps: plateau (halved once the set's fit to "
                                         "the stored train features stops improving: a check every 50 steps), "
                                         "constant (the authors'), or cosine (lr x (1 + cos(pi t / steps)) / 2 at "
                                         "step t). README, Quality: the rate's schedule.")
    augs: int = option(10, "Augmented copies of every synthetic image per step.")
    real_batch: int | str = option("auto", "Real rows per step: auto (every row when the whole split's gradient "
                                           "fits the compute and memory budget, else the largest sample that fits), "
                                           "full (every row), or an integer (the authors: ipc*augs*classes).")
    param: str = option("pyramid", "Image parameterization: pyramid or pixels.")
    init: str = option("centroid", "centroid (the real image nearest each class mean of the --backbone's "
                                     "stored features, the centroid baseline; with several --backbone, of their "
                                     "features together; with --ipc > 1 the nearest of each of ipc k-means centres; "
                                     "read once from the store's source), real "
                                     "(random real images of each class), zero (grey images: the authors' init_mode "
                                     "zero), or noise (the authors' default).")
    colour: str = option("auto", "Synthetic images in colour (rgb) or grey (one channel replicated); auto: grey "
                                 "when every image of the store's split is grey.")
    decorrelate: bool = option(True, "Colour images live in the decorrelated colour space (the authors' "
                                     "decorrelate_color).", flag="--decorrelate/--no-decorrelate")
    grow_every: int | str = option("auto", "Pyramid: steps between added levels, or auto (full resolution at "
                                           "about 1/3 of --steps, as the authors' 200 for 5000 steps).")
    chunk: int | str = option("auto", "Augmented copies per backbone pass with a graph (bounds memory), or auto.")
    real_source: str = option("store", "store (stored features) or images (end to end through the backbone, "
                                       "as the authors).")
    feature_space: str = option("raw", "Features the objective compares: raw (the backbone's), or standardized "
                                       "(each dimension shifted and scaled by the real split's mean and std, "
                                       "from the store's class statistics; the same map on both sides).")
    augment: bool = option(True, "Augmentation on both sides (--no-augment: none).", flag="--augment/--no-augment")
    pixel_prior: float = option(0.0, "Weight of a term that keeps each synthetic image's per-channel pixel mean and "
                                     "std within one spread of its class's real images (estimated from 32 real "
                                     "images per class, read once from the store's source); 0: off. README, "
                                     "Quality: pixel statistics.")
    checkpoint_every: int = option(100, "Steps between checkpoints.")
    eval_every: int = option(0, "Every K steps, a cheap probe of the current set on the store's val features "
                                f"({QUICK_PROBE}: an estimate, not the full protocol); 0: off.")
    resume: bool = option(False, "Continue the run in --out from its checkpoint.", flag="--resume")
    seed: int = option(0, "Seeds init, heads, augmentation and real batches.")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    weights: str | None = option(None, "Backbone weights file (default: the store's).")
    image_size: int | None = option(None, "Backbone input size (default: the store's).")
    split: str = option("train", "Store split giving the real side.")
    quiet: bool = option(False, "No progress bar.", flag="--quiet")
    objective: dict[str, Any] = option(help="Options of the objective given (engine.objectives)", cli=False,
                                       factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.backbone, str):  # one backbone, as a plain string (the Python API's usual form)
            self.backbone = [self.backbone]
        self.backbone = list(self.backbone)
        self.backbone_weight = [float(w) for w in self.backbone_weight]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Everything that is wrong whatever the store holds; DistillError with one line."""
        if not self.backbone:
            raise DistillError("give at least one --backbone (the store's backbone whose features are the real side)")
        if len(set(self.backbone)) != len(self.backbone):
            raise DistillError(f"--backbone repeated: {', '.join(self.backbone)}")
        if self.backbone_weight and len(self.backbone_weight) != len(self.backbone):
            raise DistillError(f"got {len(self.backbone_weight)} --backbone-weight for {len(self.backbone)} --backbone: "
                               f"give one per --backbone, or none (equal weights)")
        if any(not (math.isfinite(w) and w > 0) for w in self.backbone_weight):
            raise DistillError(f"--backbone-weight must be positive finite numbers, got {self.backbone_weight}")
        if len(self.backbone) > 1 and (self.weights is not None or self.image_size is not None):
            raise DistillError("--weights and --image-size apply to one --backbone: with several, each backbone "
                               "uses the weights and size its store was built with")
        if self.method not in OBJECTIVE_NAMES:
            raise DistillError(f"--method must be one of {', '.join(OBJECTIVE_NAMES)}, got {self.method!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise DistillError(f"--eval-every must be 0 (off) or a positive integer, got {self.eval_every!r}")
        for name in ("ipc", "steps", "augs", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DistillError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name, high in (("ipc", MAX_COUNT), ("steps", MAX_COUNT), ("augs", MAX_COUNT),
                           ("checkpoint_every", MAX_COUNT), ("eval_every", MAX_COUNT), ("image_size", MAX_IMAGE_SIZE),
                           ("seed", MAX_SEED)):
            _check_bounds(getattr(self, name), "--" + name.replace("_", "-"), high)
        resolve_lr(self.lr, self.steps, self.init)
        prior = self.pixel_prior
        if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not (math.isfinite(prior) and prior >= 0):
            raise DistillError(f"--pixel-prior must be a finite number >= 0 (0: off), got {prior!r}")
        self.pixel_prior = float(prior)
        objective_config(self.method, self.objective)
        for name, allowed in (("param", PARAMETERIZATIONS), ("init", INITS), ("real_source", REAL_SOURCES),
                              ("colour", COLOURS), ("feature_space", FEATURE_SPACES), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise DistillError(f"--{name.replace('_', '-')} must be {' or '.join(allowed)}, "
                                   f"got {getattr(self, name)!r}")
        parse_real_batch(self.real_batch)
        parse_grow_every(self.grow_every)
        parse_chunk(self.chunk)


# Upper bounds of the numeric options: counts fit a C int (torch sizes, range ends), the seed a generator's
# seed, the image size any backbone. A typo of many digits is one line, not an OverflowError traceback.
MAX_COUNT = 2**31 - 1
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**63 - 1


def _check_bounds(value: int | None, option_name: str, high: int, low: int = 0) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise DistillError(f"{option_name} must be an integer, got {value!r}")
    if value < low:
        raise DistillError(f"{option_name} must be >= {low}, got {value}")
    if value > high:
        raise DistillError(f"{option_name} must be at most {high}, got {value}")


def _positive_int_or(value: int | str, keyword: str | tuple[str, ...], option_name: str) -> int | str:
    """`keyword` itself, or a positive int (ints given as strings are accepted); else a DistillError."""
    keywords = (keyword,) if isinstance(keyword, str) else keyword
    if value in keywords:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DistillError(f"{option_name} must be a positive integer or {' or '.join(repr(k) for k in keywords)}, "
                           f"got {value!r}")
    _check_bounds(value, option_name, MAX_COUNT)
    return value


# The authors' Adam lr 2e-3 over their 5000 steps: per step Adam moves each parameter by about the lr, so
# lr x steps = 10 is the distance a run may travel. `--lr auto` keeps it for any --steps (400 steps:
# 0.025). Measured at 400 steps (Fashion-MNIST, efficientnet-lite0, --augs 2, whole-split real side):
# lr 2e-3 / 1e-2 / 2.5e-2 -> top-1 62.1 / 67.8 / 67.6 on efficientnet-lite0, 11.7 / 19.4 / 29.0 on
# dinov2-vits14-imgfocus (transfer).
LR_TIMES_STEPS = 10.0
LR_AUTO_MAX = 0.05  # runs shorter than 200 steps keep this rate: sigmoid-decoded pixels saturate beyond it
# From real images (--init centroid / real) there is nothing to build, only a picture to refine: the
# authors' rate whatever the budget. Measured at 300 steps (Fashion-MNIST, efficientnet-lite0, --augs 2,
# --init centroid; top-1 on effnet / dinov2 / opennsfw-resnet50): lr 3e-3 77.3 / 50.9 / 64.1 against
# 10 / steps = 0.033 76.4 / 35.1 / 59.9 (the large rate rewrites the picture into one only this backbone
# reads; the centroid images alone: 61.5 / 47.0 / 58.8); benchmarks/results/diag_defaults.md.
LR_FROM_REAL = 2e-3


def resolve_lr(value: float | str, steps: int, init: str = "zero") -> float:
    """`--lr`: a positive number, or 'auto': LR_FROM_REAL when `init` starts from real images, else
    LR_TIMES_STEPS / steps (at most LR_AUTO_MAX)."""
    if value == "auto":
        if init in REAL_INITS:
            return LR_FROM_REAL
        return min(LR_AUTO_MAX, LR_TIMES_STEPS / steps)
    try:
        lr = float(value)
    except (TypeError, ValueError):
        lr = float("nan")
    if isinstance(value, bool) or not (math.isfinite(lr) and lr > 0):
        raise DistillError(f"--lr must be a positive number or 'auto', got {value!r}")
    return lr


# The rate's schedule. From the centroid images a constant rate keeps moving the pixels after the distillation
# backbone's own accuracy stopped rising, and efficientnet-lite0's set loses transfer to DINOv2 on the way (1000
# steps, Fashion-MNIST, whole test split: 47.2 on DINOv2 at a constant 2e-3 against 49.3 after 300 steps). A
# cosine decay damps the late movement: 48.3; but DINOv2's own set needs that movement (52.0 constant, 51.0
# cosine; its centroid start 48.8): a decay fixed in advance cannot serve both. `plateau` reads the run
# instead: it halves the rate once the set's own fit (a quick probe of the current images, scored on stored
# train features) stops improving (benchmarks/results/diag_lr_schedule.md).
@dataclass(frozen=True)
class PlateauRule:
    """--lr-schedule plateau: every `every` steps, the current images' fit (`engine.evaluate.set_fit`: the
    cross-entropy on stored train features of probes trained on the images; over several backbones, their
    mean weighted as the loss); after `patience` checks without a new best lower by `rel_delta` of it, the
    rate is multiplied by `factor` (PyTorch's ReduceLROnPlateau, mode min, relative threshold)."""

    every: int = 50
    patience: int = 3
    factor: float = 0.5
    rel_delta: float = 1e-3
    rows: int = 10_000  # stored train rows the fit is scored on (evenly spaced over the split)

    def scale(self, fits: list[float]) -> float:
        """The factor on the base rate after the checks `fits` (losses, in order)."""
        best, bad, scale = math.inf, 0, 1.0
        for fit in fits:
            if fit < best * (1.0 - self.rel_delta):
                best, bad = fit, 0
            else:
                bad += 1
                if bad >= self.patience:
                    scale, bad = scale * self.factor, 0
        return scale


PLATEAU = PlateauRule()


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """Up to `k` indices of 0..n-1, evenly spaced, first and last included (all of them when k >= n)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


def scheduled_lr(base: float, schedule: str, index: int, steps: int, plateau_scale: float = 1.0) -> float:
    """The rate of step `index` (0-based) of a `steps`-step run: `base`, its cosine decay, or `base` times
    the plateau rule's factor so far."""
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * index / steps))
    if schedule == "plateau":
        return base * plateau_scale
    return base


def parse_real_batch(value: int | str) -> int | str:
    """'auto', 'full', or a positive int."""
    return _positive_int_or(value, ("auto", "full"), "--real-batch")


def parse_grow_every(value: int | str) -> int | str:
    """'auto' or a positive int."""
    return _positive_int_or(value, "auto", "--grow-every")


def parse_chunk(value: int | str) -> int | str:
    """'auto' or a positive int (copies per backbone pass)."""
    return _positive_int_or(value, "auto", "--chunk")
