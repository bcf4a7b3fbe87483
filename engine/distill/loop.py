"""The distillation loop: `distill(DistillConfig) -> DistillResult` (`engine distill`), as three named
stages: `setup` (everything that can fail on bad input, before anything is written), `step` (one
optimization step), `finish` (outputs). One code path for any world size (see engine.distill.backprop).

One step (LGM defaults, as the authors' code; other objectives plug in through engine.objectives):
1. grow the pyramid when a level is due (then Adam's state is reset, as the authors do);
2. draw the real batch (features from the store, or end to end from images: `engine.real`);
3. draw `augs` independent augmentations of every synthetic image (flip, random resized crop via an
   affine grid, pixel noise: `featurestore.augment`);
4. features of the M = n * augs augmented copies through the frozen backbone (bf16 autocast on CUDA,
   fp32 on CPU), loss = objective(syn features, real features) with a fresh random head;
5. back-propagate to the image parameters (chunked when the whole graph would not fit), Adam step.

Checkpoints (engine.distill.checkpoint) every `checkpoint_every` steps, at the end and on Ctrl-C. A
non-finite loss stops the run before the optimizer step, without writing a checkpoint: the last good
one stays.

Several processes (torchrun): launched with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set and
WORLD_SIZE > 1, `distill` joins the process group (NCCL on cuda:LOCAL_RANK, gloo on the CPU). Every rank
holds the same full synthetic parameters, the same generators and seeds, and so draws the same random
head, the augmentation parameters of all M copies (it uses its own share; drawing all keeps the random
streams those of one process) and the same real batch; every rank loads the store's features itself
(the store must be readable from every node; nothing big is broadcast). Loss and image gradients are
those of one process up to floating-point summation order, so a checkpoint resumes under any world size
(bit for bit under the same one). Rank 0 alone writes config.json, metrics.jsonl, checkpoints and
outputs and shows the progress bar; with --resume every rank reads the checkpoint (--out must be on a
filesystem all ranks see). Setup errors are agreed on before anything is written: every rank stops, the
failing one with its message. Ctrl-C / SIGTERM (torchrun forwards them to every rank) only set a flag;
the flags are combined at the step's gradient reduction, so all ranks stop at the same step, rank 0
saves the checkpoint and every rank raises `DistillInterrupted`. A non-finite loss is likewise decided
collectively. With --real-source images every rank computes the whole real batch's features.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from engine.distill.backprop import SyntheticSide, resolve_copies_per_pass
from engine.distill.checkpoint import (load_checkpoint, read_checkpoint, run_identity, save_checkpoint,
                                      store_id)
from engine.distill.config import (REAL_INITS, DistillConfig, DistillError, NonFiniteLossError, parse_chunk,
                                   parse_grow_every, parse_real_batch, resolve_lr)
from engine.distill.outdir import (CHECKPOINT_FILE, CONFIG_FILE, DISTILLED_FILE, GRID_FILE, IMAGES_DIR,
                                    LOSS_PLOT_FILE, METRICS_FILE, check_out_dir, recheck_out_dir)
from engine.distill.seeds import GENERATORS, derived_seed, make_generators
from engine.distill.signals import DistillInterrupted, defer_sigint, sigterm_as_ctrl_c, stop_flags
from engine.distributed import reduce_step
from engine.imagefolder import class_folder_names, write_imagefolder
from engine.distill.feature_space import FeatureMap, feature_map
from engine.objectives import Objective, get_objective
from engine.outputs import append_metric, save_grid, save_loss_plot, save_safetensors, write_metrics
from engine.parameterizations import (SyntheticImages, auto_grow_every, check_schedule, make_synthetic,
                                      pyramid_full_step)
from engine.real import ImageRealSource, RealSource, StoreRealSource, plan_real_batch
from featurestore.augment import AugmentConfig
from featurestore.progress import progress
from featurestore.distributed import DistContext, any_rank, contiguous_share, destroy, init_process_group_from_env
from featurestore.errors import UserError, one_line
from featurestore.runtime import atomic_write_json, exclusive_lock, free_memory, tool_version, write_errors


@dataclass
class DistillResult:
    out: Path
    images: Tensor  # float32 [N, 3, R, R] in [0, 1]
    labels: Tensor  # int64 [N]
    class_names: list[str]
    losses: list[float]  # one per completed step, from step 1
    steps_done: int
    resumed_from: int | None
    config: dict[str, Any] = field(default_factory=dict)
    rank: int = 0  # this process' rank under torchrun (0 in a single process); rank 0 wrote the outputs
    world_size: int = 1


@dataclass
class Member:
    """One backbone of a run: its stored real side, its pass of the synthetic copies, its weight in the
    loss (a run distilled against several backbones has one member each)."""

    split: Any  # the store split giving the real side
    backbone: Any
    real: RealSource
    side: SyntheticSide
    weight: float  # normalized: the members' weights sum to 1
    copies_per_pass: int = 0
    pass_info: dict[str, Any] = field(default_factory=dict)
    real_plan: str = ""
    probe: Callable[[], float] | None = None  # --eval-every: top-1 of the current images (rank 0)
    features: FeatureMap | None = None  # --feature-space: the map both sides pass through (None: raw)

    @property
    def name(self) -> str:
        return self.split.backbone


@dataclass
class Run:
    """Everything `setup` prepares and the steps share."""

    cfg: DistillConfig
    ctx: DistContext
    out: Path
    store: Any
    members: list[Member]
    objective: Objective
    generators: dict[str, torch.Generator]
    synthetic: SyntheticImages
    optimizer: torch.optim.Optimizer
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    start_step: int
    resumed: bool
    lr_history: list[dict[str, Any]]
    resolved: dict[str, Any]  # what the automatic options resolved to (grow_every, real_batch)
    last_saved: int | None = None

    @property
    def main(self) -> bool:
        return self.ctx.is_main

    @property
    def splits(self) -> list[Any]:
        return [m.split for m in self.members]

    def writes(self):
        """Around every write into --out: an OSError (disk full, permission lost) becomes one line saying
        how to go on. Checkpoints are written atomically, so the last one on disk is always whole."""
        then = (f"rerun the same command with --resume (the checkpoint of step {self.last_saved} is intact)"
                if self.last_saved is not None else
                "rerun the same command (no checkpoint was written yet: it starts again from step 0)")
        return write_errors(f"to --out {self.out}", then, DistillError)

    def save_checkpoint(self, step: int) -> None:
        if not self.main:  # every rank holds the same state; rank 0 writes it
            return
        with self.writes():
            self._save_checkpoint(step)
        self.last_saved = step

    def _save_checkpoint(self, step: int) -> None:
        save_checkpoint(self.out, {
            "step": step, "run": run_identity(self.cfg, self.splits, self.resolved),
            "synthetic": self.synthetic.state_dict(),
            "optimizer": self.optimizer.state_dict(), "lr_history": self.lr_history,
            "generators": {k: g.get_state() for k, g in self.generators.items()}, "metrics": self.metrics})


def distill(cfg: DistillConfig) -> DistillResult:
    """Run (or resume) a distillation; writes everything into `cfg.out` (see the module docstring).
    Under torchrun, every rank calls this and rank 0 writes."""
    cfg.validate()
    ctx = init_process_group_from_env(cfg.device)
    with ExitStack() as held:  # the output directory's lock, held by rank 0 until the outputs are written
        try:
            run = setup(cfg, ctx, held)
            steps(run)
            return finish(run)
        finally:
            destroy(ctx)


# ----------------------------------------------------------------------------------------------------
# setup

def setup(cfg: DistillConfig, ctx: DistContext, held: ExitStack) -> Run:
    """Every check and every load, agreed on by all ranks; then rank 0 takes the output directory's lock
    (kept in `held`, agreed on too) and writes config.json. A rank that cannot start stops every rank
    before anything is written: no rank is left waiting in the first step's collectives."""
    run: Run | None = None
    error: Exception | None = None
    try:
        run = _prepare(cfg, ctx)
    except Exception as exc:  # noqa: BLE001 - re-raised on this rank below, once every rank knows
        if not ctx.is_distributed:
            raise
        error = exc
    _agree(error)
    assert run is not None
    if run.main:
        try:
            held.enter_context(exclusive_lock(run.out, "output directory"))
            recheck_out_dir(run.out, run.resumed)
        except Exception as exc:  # noqa: BLE001 - see above
            if not ctx.is_distributed:
                raise
            error = exc
    _agree(error)
    if run.main:
        with run.writes():
            atomic_write_json(run.out / CONFIG_FILE, run.config)
            write_metrics(run.out / METRICS_FILE, run.metrics)
    return run


def _agree(error: Exception | None) -> None:
    """Collective: raise on every rank if some rank failed (its own error there, one line elsewhere)."""
    if any_rank(error is not None):
        if error is not None:
            raise error
        raise DistillError("another rank could not start the run (its error is printed by that rank); "
                           "nothing was written")


# Bytes per synthetic pixel value while optimizing: the parameters (a pyramid holds ~4/3 of the pixels),
# their gradients and two Adam moments (4 x 4/3 x 4 bytes), plus the decoded images and the buffers of
# decoding them forward and backward (~5 x 4 bytes). An estimate, to refuse impossible runs up front.
_BYTES_PER_SYNTHETIC_VALUE = 42


# Per augmented copy and step, whatever --chunk does: its features and their gradient (float32 [D] each,
# for every backbone) and its augmentation parameters (an affine grid's 2x3 matrix, flags, seeds).
_BYTES_PER_COPY_PARAMS = 64


def check_memory(cfg: DistillConfig, num_classes: int, resolution: int, device: torch.device,
                 dims: Sequence[int] = ()) -> None:
    """Refuse (one line) a synthetic set, or a number of augmented copies per step, that cannot fit in
    memory, before allocating any of it. `dims`: the feature size of each backbone."""
    values = num_classes * cfg.ipc * 3 * resolution * resolution
    need = values * _BYTES_PER_SYNTHETIC_VALUE
    have = free_memory(device)
    where = "the GPU" if device.type == "cuda" else "this machine"
    if need > have:
        raise DistillError(f"--ipc {cfg.ipc} x {num_classes} classes at {resolution} px needs about "
                           f"{need / 2**30:.1f} GiB for the synthetic images and their optimizer state, and "
                           f"{where} has {have / 2**30:.1f} GiB free: lower --ipc")
    copies = num_classes * cfg.ipc * cfg.augs
    copies_need = copies * (2 * 4 * sum(dims) + _BYTES_PER_COPY_PARAMS)
    if need + copies_need > have:
        raise DistillError(f"--augs {cfg.augs} x --ipc {cfg.ipc} x {num_classes} classes = {copies} augmented "
                           f"copies per step need about {copies_need / 2**30:.1f} GiB for their features and "
                           f"augmentation parameters (besides {need / 2**30:.1f} GiB for the images), and {where} "
                           f"has {have / 2**30:.1f} GiB free: lower --augs (or --ipc)")


PROBE_NOTE = ("--eval-every: 1 seed, 10 cached views, 300 epochs, tested on the store's val features: a cheap "
              "estimate; `engine eval` runs the full protocol")


def _quick_probe(cfg: DistillConfig, ctx: DistContext, store, member: Member, synthetic) -> Callable[[], float] | None:
    """The --eval-every probe of the current images on one backbone (rank 0 only; None on other ranks).
    It draws from its own generators, so a run's trajectory is the same with or without it."""
    from engine.evaluate import quick_probe

    val_split = store.split(member.name, "val")  # a missing val split: one line naming what there is
    if not ctx.is_main:
        return None
    val = val_split.load(view=0, device=ctx.device)

    def probe() -> float:
        with torch.no_grad():
            images = synthetic.images().detach()
        return quick_probe(member.backbone, images, synthetic.labels, val.features, val.labels, store.num_classes,
                           seed=cfg.seed)

    return probe


def _init_features(splits: list) -> tuple[Any, Tensor]:
    """(view-0 features, the split's data) the centroid init picks from. Several backbones: each one's
    features divided by its mean within-class distance, then concatenated, so the picked image is the one
    most typical of its class for every backbone at once (not only for the first)."""
    data = splits[0].load(view=0)
    if len(splits) == 1:
        return data.features.numpy(), data
    parts = []
    for split in splits:
        other = data if split is splits[0] else split.load(view=0)
        if not torch.equal(other.rows, data.rows):  # _splits checked the samples: a damaged store
            raise DistillError(f"{split.backbone}/{split.split_name} and {splits[0].backbone}/"
                               f"{splits[0].split_name} list their rows in another order: rebuild one of them")
        features = other.features.double()
        spread = torch.zeros(())
        for c in other.labels.unique():
            members = features[other.labels == c]
            spread += ((members - members.mean(0)) ** 2).sum()
        parts.append(features / (spread / len(features)).sqrt().clamp_min(1e-12))
    return torch.cat(parts, dim=1).float().numpy(), data


def _real_init_images(splits: list, num_classes: int, ipc: int, resolution: int, generator: torch.Generator,
                      init: str = "real") -> Tensor:
    """ipc real images per class (canonical, at the synthetic resolution), class by class: random ones
    (`real`), or (`centroid`) the one whose stored view-0 features are nearest the class mean (the pick of
    `engine baseline --kind centroid`), with ipc > 1 the nearest of each of ipc k-means centres; with
    several backbones, in their joint features (`_init_features`)."""
    from engine.baselines import pick_cluster_centroids
    from featurestore.datasets import canonical_image

    split = splits[0]
    features, data = _init_features(splits) if init == "centroid" else (None, split.load(view=0))
    nearest = (pick_cluster_centroids(features, data.labels.numpy(), num_classes, ipc)
               if init == "centroid" else None)
    picks = []
    for c in range(num_classes):
        rows = data.rows[data.labels == c]
        if rows.numel() < ipc:
            raise DistillError(f"--init {init} needs {ipc} images of class {c} "
                               f"({split.store.class_names[c]!r}); the store has {rows.numel()}")
        if nearest is not None:
            picks.append(data.rows[torch.as_tensor(nearest[c], dtype=torch.int64)])
        else:
            picks.append(rows[torch.randperm(rows.numel(), generator=generator)[:ipc]])
    # Images are found by sample id, so a source folder that changed since the build cannot hand class b
    # the image of class a.
    try:
        dataset, indices = split.source(torch.cat(picks))
    except UserError as exc:
        raise DistillError(f"--init {init} reads {len(picks) * ipc} real images from the store's source: "
                           f"{one_line(exc)}; make the source readable again, or start from grey images with "
                           f"--init zero") from None
    return torch.stack([canonical_image(dataset.load_image(i), resolution) for i in indices])


def _splits(cfg: DistillConfig, store) -> list[Any]:
    """The store split of every --backbone, checked to describe one dataset at one image size: the
    synthetic images are shared, so every backbone must see the same samples at the same resolution."""
    splits = [store.split(name, cfg.split) for name in cfg.backbone]
    first = splits[0]
    for split in splits:
        if split.num_valid == 0:
            raise DistillError(f"{split.backbone}/{cfg.split} of {cfg.store} has no usable rows (every sample was "
                               f"skipped): nothing to distill from; see `fs info --store {cfg.store}`")
        for what, ours, theirs in (
                ("samples (sample ids and labels)", split.attrs.get("samples_digest"), first.attrs.get("samples_digest")),
                ("image size", (split.image_size, split.resize_size), (first.image_size, first.resize_size))):
            if ours != theirs:
                raise DistillError(f"{split.backbone}/{cfg.split} and {first.backbone}/{cfg.split} in {cfg.store} hold "
                                   f"different {what} ({ours} vs {theirs}): distill several backbones only from "
                                   f"splits built from the same images at the same --image-size")
    return splits


def _prepare(cfg: DistillConfig, ctx: DistContext) -> Run:
    from featurestore.store import FeatureStore

    out = Path(cfg.out).expanduser()
    resume = check_out_dir(out, cfg.resume, ctx.is_main)
    store = FeatureStore.open(cfg.store)
    splits = _splits(cfg, store)
    num_classes = store.num_classes
    objective = get_objective(cfg.method, num_classes, **cfg.objective)
    resolution = splits[0].resize_size
    # Read once, before anything heavy: a resume takes its automatic choices from the run's start.
    saved_state = read_checkpoint(out) if resume else None
    grow_every = (auto_grow_every(resolution, cfg.steps) if parse_grow_every(cfg.grow_every) == "auto"
                  else int(cfg.grow_every))
    saved_grow_every = saved_state["run"].get("grow_every") if saved_state is not None else None
    if parse_grow_every(cfg.grow_every) == "auto" and isinstance(saved_grow_every, int) \
            and not isinstance(saved_grow_every, bool) and saved_grow_every >= 1:
        # --grow-every auto is fixed when a run starts (from its first --steps) and recorded: a resume
        # with a larger --steps extends that schedule instead of changing it mid-run.
        grow_every = saved_grow_every
    if cfg.param == "pyramid" and cfg.init not in REAL_INITS:
        problem = check_schedule(resolution, grow_every, cfg.steps)  # before anything is loaded
        if problem is not None:
            raise DistillError(problem)
    device = ctx.device
    if device.type == "cuda":
        # The real side's fp32 GEMMs (and CLP's solve inputs) on TF32 tensor cores: ~4x the IEEE fp32 rate;
        # the gradients are compared by cosine, far above TF32's 1e-3 relative precision.
        torch.backends.cuda.matmul.allow_tf32 = True
    plans = [plan_real_batch(parse_real_batch(cfg.real_batch), split.num_valid, num_classes, split.dim,
                             cfg.ipc * cfg.augs * num_classes, device.type) for split in splits]
    grows = cfg.param == "pyramid" and cfg.init not in REAL_INITS  # only a growing pyramid has a schedule
    grey = cfg.colour == "grey" or (cfg.colour == "auto" and all(split.greyscale for split in splits))
    resolved = {"grow_every": grow_every if grows else None, "colour": "grey" if grey else "rgb",
                "real_batch": ["full" if batch is None else batch for batch, _ in plans]}
    checkpoint = load_checkpoint(out, cfg, splits, resolved, state=saved_state) if resume else None
    check_memory(cfg, num_classes, resolution, device, dims=[split.dim for split in splits])
    if cfg.image_size is not None and cfg.image_size != splits[0].image_size:
        raise DistillError(f"the store's {splits[0].backbone}/{cfg.split} features were computed at "
                           f"{splits[0].image_size} px, not --image-size {cfg.image_size}: omit --image-size, or "
                           f"build a store at that size")
    weights = cfg.backbone_weight or [1.0] * len(splits)
    members = []
    for split, (real_batch, real_plan), weight in zip(splits, plans, weights):
        backbone = split.open_backbone(device, weights=cfg.weights)
        if cfg.real_source == "store":
            real: RealSource = StoreRealSource.from_split(split, batch=real_batch, augment_views=cfg.augment,
                                                          device=device)
        else:
            real = ImageRealSource.from_split(split, backbone, batch=real_batch, augment_images=cfg.augment)
        members.append(Member(split=split, backbone=backbone, real=real, weight=weight / sum(weights),
                              side=SyntheticSide(backbone, cfg.augs, cfg.augment, AugmentConfig()),
                              real_plan=real_plan, features=feature_map(cfg.feature_space, split, device)))
        if ctx.is_main and not cfg.quiet:
            prefix = "" if len(splits) == 1 else f"{split.backbone}: "
            print(prefix + real_plan, file=sys.stderr)
            if getattr(real, "note", None):
                print(f"{prefix}real side: {real.note}", file=sys.stderr)
    generators = make_generators(cfg.seed)
    if checkpoint is None and cfg.init in REAL_INITS:
        init_images = _real_init_images(splits, num_classes, cfg.ipc, resolution, generators["init"], cfg.init)
    elif checkpoint is not None:  # overwritten by the checkpoint: no draw, no image reads
        init_images = torch.zeros(num_classes * cfg.ipc, 3, resolution, resolution)
    else:
        init_images = None
    synthetic = make_synthetic(cfg.param, num_classes, cfg.ipc, resolution,
                               init="real" if cfg.init in REAL_INITS else cfg.init, real_images=init_images,
                               grow_every=grow_every, channels=1 if grey else 3, decorrelate=cfg.decorrelate,
                               generator=generators["init"], device=device)
    lr = resolve_lr(cfg.lr, cfg.steps, cfg.init)
    optimizer = torch.optim.Adam(synthetic.parameters(), lr=lr)
    metrics: list[dict[str, Any]] = []
    start_step = 0
    lr_history = [{"from_step": 0, "lr": lr}]
    if checkpoint is not None:
        try:
            synthetic.load_state_dict(checkpoint["synthetic"])
            optimizer = torch.optim.Adam(synthetic.parameters(), lr=lr)
            optimizer.load_state_dict(checkpoint["optimizer"])
            for name, gen in generators.items():
                gen.set_state(checkpoint["generators"][name])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise DistillError(f"{out / CHECKPOINT_FILE} does not fit this run ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]}); start a new run in another --out") from None
        metrics = list(checkpoint["metrics"])
        start_step = int(checkpoint["step"])
        # A changed --lr on resume is allowed (the way out of a diverged run) and recorded.
        lr_history = list(checkpoint.get("lr_history") or [{"from_step": 0, "lr": checkpoint["optimizer"]
                                                            ["param_groups"][0]["lr"]}])
        if lr_history[-1]["lr"] != lr:
            lr_history.append({"from_step": start_step, "lr": lr})
            for group in optimizer.param_groups:
                group["lr"] = lr
            if ctx.is_main:
                print(f"note: --lr {lr_history[-2]['lr']} -> {lr} from step {start_step}", file=sys.stderr)
    copies_per_step = members[0].side.copies(synthetic.n)
    shares = [contiguous_share(copies_per_step, r, ctx.world_size) for r in range(ctx.world_size)]
    for member in members:
        member.copies_per_pass, member.pass_info = resolve_copies_per_pass(
            parse_chunk(cfg.chunk), member.side, synthetic.images().detach(), copies=max(1, len(shares[ctx.rank])))
        if cfg.eval_every:
            member.probe = _quick_probe(cfg, ctx, store, member, synthetic)
    config = {
        "arguments": cfg.to_json(),
        "method": cfg.method,
        "objective": objective.config(),
        "seeds": {"seed": cfg.seed, **{f"{k}_generator": derived_seed(cfg.seed, k) for k in GENERATORS}},
        "store": {"path": store_id(cfg.store), "dataset": store.dataset, "split": cfg.split,
                  "rows": members[0].real.num_rows},
        "backbones": [{
            "name": m.backbone.name, "weight": m.weight, "fingerprint": m.backbone.fingerprint,
            "image_size": m.backbone.image_size, "resize_size": m.backbone.resize_size,
            "weights_path": m.backbone.weights_path,
            "store": {"fingerprint": m.split.fingerprint, "views": m.split.views, "dtype": m.split.attrs.get("dtype")},
            "real": {**m.real.describe(), "plan": m.real_plan,
                     "batch_resolved": "full" if m.real.batch is None else min(m.real.batch, m.real.num_rows)},
            "chunk": {"copies_per_pass": m.copies_per_pass, "copies_per_step": copies_per_step, **m.pass_info},
        } for m in members],
        "synthetic": {**synthetic.describe(), "num_images": synthetic.n, "ipc": cfg.ipc,
                      "full_resolution_from_step": (pyramid_full_step(resolution, grow_every)
                                                    if cfg.param == "pyramid" and cfg.init not in REAL_INITS else 0)},
        "augmentation": {"enabled": cfg.augment, **AugmentConfig().to_json(), "synthetic_copies": members[0].side.augs},
        "optimizer": {"name": "Adam", "lr": lr, "lr_option": cfg.lr, "lr_history": lr_history,
                      "reset_on_pyramid_growth": cfg.param == "pyramid"},
        "device": str(device), "amp": "bf16 autocast (backbone forward)" if device.type == "cuda" else "fp32",
        "class_names": store.class_names, "class_folders": class_folder_names(store.class_names),
        "tool_version": tool_version(), "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "resumed_from_step": start_step if checkpoint is not None else None,
        "resolved": resolved,  # what the automatic options resolved to at the run's start
    }
    if ctx.is_distributed:
        config["distributed"] = {"world_size": ctx.world_size, "backend": ctx.backend,
                                 "copies_per_rank": [len(share) for share in shares],
                                 "note": "device, chunk and peak memory are rank 0's"}
    return Run(cfg=cfg, ctx=ctx, out=out, store=store, members=members, objective=objective,
               lr_history=lr_history, resolved=resolved, generators=generators, synthetic=synthetic,
               optimizer=optimizer, config=config, metrics=metrics, start_step=start_step,
               resumed=checkpoint is not None, last_saved=start_step if checkpoint is not None else None)


# ----------------------------------------------------------------------------------------------------
# steps


def step(run: Run, index: int, stop_requested: list[bool]) -> tuple[float, list[float], bool]:
    """Optimization step `index` (0-based) up to the gradient reduction: returns (loss, each backbone's
    loss, any rank asked to stop; `stop_requested[0]` is read at the reduction, after this rank's forward
    and backward). The optimizer update is left to the caller (it must not be interrupted halfway).

    Several backbones: the loss is the weighted mean of their objectives. The copies share one
    augmentation draw; each backbone back-propagates its own term into the shared image parameters (so
    memory stays bounded by one backbone's pass)."""
    synthetic, generators = run.synthetic, run.generators
    # The order of random draws: growth (init stream), real batches, augmentations, then the heads.
    if synthetic.grow(index):
        run.optimizer = torch.optim.Adam(synthetic.parameters(), lr=run.lr_history[-1]["lr"])
    reals = [member.real.sample(generators["real"]) for member in run.members]
    plan = run.members[0].side.draw(synthetic.n, generators["augment"])
    run.optimizer.zero_grad(set_to_none=True)
    losses = []
    for member, (real_features, real_labels) in zip(run.members, reals):
        if member.features is not None:
            real_features = member.features(real_features.to(member.features.shift.device, torch.float32))

        def loss_fn(syn_features: Tensor, copy_labels: Tensor, weight=member.weight, real_features=real_features,
                    real_labels=real_labels, features=member.features) -> Tensor:
            if features is not None:
                syn_features = features(syn_features.float())
            return weight * run.objective.loss(syn_features, copy_labels, real_features, real_labels,
                                               generators["head"])

        loss = member.side.loss_and_backward(synthetic.images, synthetic.labels, plan, member.copies_per_pass,
                                             loss_fn, run.ctx.rank, run.ctx.world_size)
        losses.append(float(loss) / member.weight)
    loss_value = sum(member.weight * value for member, value in zip(run.members, losses))
    any_stop, any_nonfinite = reduce_step(synthetic.parameters(), stop_requested[0], not math.isfinite(loss_value))
    if any_nonfinite and math.isfinite(loss_value):
        loss_value = float("nan")  # another rank saw a non-finite loss: stop with it
    return loss_value, losses, any_stop


def steps(run: Run) -> None:
    """Steps from the start (or the checkpoint) to `cfg.steps`, with checkpoints and interrupts."""
    cfg, device = run.cfg, run.ctx.device
    metrics_path = run.out / METRICS_FILE
    elapsed_before = float(run.metrics[-1]["seconds"]) if run.metrics else 0.0
    run_start = time.perf_counter()
    index = run.start_step
    _reset_peak_memory(device)
    bar = progress(cfg.steps, f"distill {cfg.method}", "step", disable=cfg.quiet or not run.main,
                   initial=run.start_step)
    # A single process takes Ctrl-C and SIGTERM as KeyboardInterrupt (held only around the update); ranks
    # of a distributed run only flag them and stop together at a step boundary.
    signals = stop_flags() if run.ctx.is_distributed else sigterm_as_ctrl_c()
    states: dict[str, Any] = {}
    drawn = False  # this step's random draws are made, the parameters not yet updated
    try:
        with signals as stop_requested:
            try:
                while index < cfg.steps:
                    states = {k: g.get_state() for k, g in run.generators.items() if k != "init"}
                    t0 = time.perf_counter()
                    try:
                        loss_value, member_losses, any_stop = step(run, index, stop_requested)
                        drawn = True
                    except KeyboardInterrupt:
                        any_stop = True
                    if any_stop:
                        # Nothing of this step reached the parameters (a growth is a consistent state on its own):
                        # rewind the step's random draws and save the state "after `index` steps".
                        for k, state in states.items():
                            run.generators[k].set_state(state)
                        _save_on_stop(run, index)
                    if not math.isfinite(loss_value):
                        if run.last_saved is not None:
                            advice = (f"the last good checkpoint (step {run.last_saved}) is kept: rerun with --resume "
                                      f"and a lower --lr (now {run.lr_history[-1]['lr']:.3g}) to continue from it with the "
                                      f"new rate")
                        else:
                            advice = (f"no checkpoint was written yet: rerun the same command with a lower --lr "
                                      f"(now {run.lr_history[-1]['lr']:.3g}); it starts again from step 0")
                        raise NonFiniteLossError(f"the loss became {loss_value} at step {index + 1}; {advice}")
                    try:
                        with (defer_sigint() if not run.ctx.is_distributed else nullcontext()):
                            run.optimizer.step()
                            index += 1
                            drawn = False
                            now = time.perf_counter()
                            record = {"step": index, "loss": loss_value, "step_seconds": round(now - t0, 6),
                                      "seconds": round(elapsed_before + now - run_start, 6),
                                      "peak_memory_mb": round(_peak_memory_mb(device), 2)}
                            if len(run.members) > 1:
                                record["loss_by_backbone"] = {m.name: v for m, v in zip(run.members, member_losses)}
                            if cfg.param == "pyramid":
                                record["levels"] = len(run.synthetic.parameters())
                            run.metrics.append(record)
                            if run.main:
                                with run.writes():
                                    append_metric(metrics_path, record)
                            if index % cfg.checkpoint_every == 0 or index == cfg.steps:
                                run.save_checkpoint(index)
                        probes = [m for m in run.members if m.probe is not None]
                        if probes and (index % cfg.eval_every == 0 or index == cfg.steps):
                            t_probe = time.perf_counter()
                            by_backbone = {m.name: round(m.probe(), 3) for m in probes}
                            top1 = sum(by_backbone.values()) / len(by_backbone)
                            probe_seconds = time.perf_counter() - t_probe
                            run_start += probe_seconds  # distillation time excludes the probe's
                            probed = {"step": index, "probe_top1": round(top1, 3), "probe_seconds": round(probe_seconds, 3),
                                      "seconds": record["seconds"]}
                            if len(by_backbone) > 1:
                                probed["probe_top1_by_backbone"] = by_backbone
                            run.metrics.append(probed)
                            if run.main:
                                with run.writes():
                                    append_metric(metrics_path, probed)
                            bar.set_postfix(loss=f"{loss_value:.4f}", probe=f"{top1:.1f}%", refresh=False)
                    except KeyboardInterrupt:
                        if index != run.last_saved:
                            run.save_checkpoint(index)
                        raise DistillInterrupted(index, True, run.out) from None
                    if "probe_top1" not in run.metrics[-1]:
                        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                    bar.update(1)
            except DistillInterrupted:
                raise
            except KeyboardInterrupt:
                # Ctrl-C / SIGTERM in the bookkeeping between the guarded parts of a step (progress bar,
                # generator snapshots): the state is that of `index` finished steps once this step's
                # random draws, if made, are rewound.
                if drawn:
                    for k, state in states.items():
                        run.generators[k].set_state(state)
                if index != run.last_saved:
                    run.save_checkpoint(index)
                raise DistillInterrupted(index, True, run.out) from None
    finally:
        bar.close()
    if run.last_saved != index:
        run.save_checkpoint(index)


def _save_on_stop(run: Run, index: int) -> None:
    """Save the checkpoint after a stop request and raise DistillInterrupted on every rank."""
    failure: Exception | None = None
    try:
        run.save_checkpoint(index)
    except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know
        failure = exc
    saved = not any_rank(failure is not None)  # every rank waits until rank 0 has written it
    if failure is not None:
        raise failure
    raise DistillInterrupted(index, saved, run.out)


def _reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory count at this run, so a run's peak is its own even when the process made
    other runs before (a notebook, a benchmark, the demo). On a CPU under Linux, writing 5 to
    /proc/self/clear_refs resets the process's RSS high-water mark (VmHWM); where that is not allowed the
    peak stays the process's (said in `_peak_memory_mb`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory since `_reset_peak_memory`: CUDA max allocated, or on a CPU the RSS high-water mark
    (VmHWM; ru_maxrss, the process's peak since it started, where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # pragma: no cover - Windows
        import psutil

        return psutil.Process().memory_info().rss / 2**20


# ----------------------------------------------------------------------------------------------------
# finish


def finish(run: Run) -> DistillResult:
    """Outputs (every rank holds the same images; rank 0 writes them)."""
    with torch.no_grad():
        images = run.synthetic.images().detach().float().cpu()
    labels = run.synthetic.labels.cpu()
    index = run.metrics[-1]["step"] if run.metrics else run.start_step
    run.config["steps_done"] = index
    losses = [m["loss"] for m in run.metrics if "loss" in m]
    run.config["final_loss"] = losses[-1] if losses else None
    probes = [m for m in run.metrics if "probe_top1" in m]
    if probes:
        run.config["probe"] = {"final_top1": probes[-1]["probe_top1"], "at_step": probes[-1]["step"],
                               "recipe": PROBE_NOTE}
    class_names = run.store.class_names
    if run.main:
        with run.writes():
            write_imagefolder(run.out / IMAGES_DIR, images, labels, class_names)
            atomic_write_json(run.out / CONFIG_FILE, run.config)
            save_safetensors(run.out / DISTILLED_FILE, images, labels, class_names, run.config)
            save_grid(run.out / GRID_FILE, images, labels, class_names)
            save_loss_plot(run.out / LOSS_PLOT_FILE, run.metrics,
                           f"{run.cfg.method} {' + '.join(m.name for m in run.members)} ipc={run.cfg.ipc} "
                           f"({run.store.dataset})")
    return DistillResult(out=run.out, images=images, labels=labels, class_names=class_names,
                         losses=[m["loss"] for m in run.metrics if "loss" in m], steps_done=index,
                         resumed_from=run.start_step if run.resumed else None, config=run.config,
                         rank=run.ctx.rank, world_size=run.ctx.world_size)
