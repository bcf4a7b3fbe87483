"""`prepare`: every check and load before a run's first step, read-only, as named parts assembled into a
`Run` (`loop.setup` then takes the lock and writes): the automatic options resolved, the members, the
synthetic images (from real images, or as the checkpoint left them), the optimizer and metrics at the
start (restored on --resume), the passes sized, and the record written to config.json."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.distill.backprop import resolve_copies_per_pass
from engine.distill.checkpoint import load_checkpoint, read_checkpoint, store_id
from engine.distill.config import (REAL_INITS, DistillConfig, DistillError, parse_chunk, parse_grow_every,
                                   parse_real_batch, resolve_lr)
from engine.distill.members import Member, make_members, member_fit, member_quick_probe, open_splits
from engine.distill.memory import check_memory
from engine.distill.outdir import CHECKPOINT_FILE, check_out_dir
from engine.distill.pixel_prior import PixelStatistics, real_pixel_statistics
from engine.distill.adam import adam, load_adam_state
from engine.distill.run import Run
from engine.distill.seeds import GENERATORS, derived_seed, make_generators
from engine.imagefolder import class_folder_names
from engine.objectives import Objective, get_objective
from engine.parameterizations import SyntheticImages, auto_grow_every, check_schedule, make_synthetic, pyramid_full_step
from engine.real import plan_real_batch
from featurestore.augment import AugmentConfig
from featurestore.distributed import DistContext, contiguous_share
from featurestore.errors import UserError, one_line
from featurestore.runtime import tool_version


def prepare(cfg: DistillConfig, ctx: DistContext) -> Run:
    """Every check and load of `setup`, in the order that fails cheapest first; writes nothing."""
    from featurestore.store import FeatureStore

    out = Path(cfg.out).expanduser()
    resume = check_out_dir(out, cfg.resume, ctx.is_main)
    store = FeatureStore.open(cfg.store)
    splits = open_splits(cfg, store)
    objective = get_objective(cfg.method, store.num_classes, **cfg.objective)
    # Read once, before anything heavy: a resume takes its automatic choices from the run's start.
    saved_state = read_checkpoint(out) if resume else None
    options = resolve_options(cfg, splits, saved_state, ctx.device)
    if ctx.device.type == "cuda":
        # The real side's fp32 GEMMs (and CLP's solve inputs) on TF32 tensor cores: ~4x the IEEE fp32 rate;
        # the gradients are compared by cosine, far above TF32's 1e-3 relative precision.
        torch.backends.cuda.matmul.allow_tf32 = True
    checkpoint = load_checkpoint(out, cfg, splits, options.record, state=saved_state) if resume else None
    check_memory(cfg, store.num_classes, splits[0].resize_size, ctx.device, [split.dim for split in splits],
                 ctx.is_distributed)
    check_image_size(cfg, splits)
    members = make_members(cfg, ctx, splits, options.real_batches)
    generators = make_generators(cfg.seed)
    synthetic = new_synthetic(cfg, splits, options, generators, resuming=checkpoint is not None, device=ctx.device)
    lr = resolve_lr(cfg.lr, cfg.steps, cfg.init)
    start = (fresh_start(synthetic, lr) if checkpoint is None else
             restored_start(checkpoint, synthetic, generators, lr, out, ctx.is_main))
    shares = size_passes(cfg, ctx, store, members, synthetic)
    pixel_stats = pixel_statistics(cfg, splits, checkpoint, out, ctx)
    config = run_config(cfg, ctx, store, objective, members, synthetic, options, start, lr, checkpoint is not None,
                        shares)
    return Run(cfg=cfg, ctx=ctx, out=out, store=store, members=members, objective=objective,
               lr_history=start.lr_history, resolved=options.record, generators=generators, synthetic=synthetic,
               optimizer=start.optimizer, config=config, metrics=start.metrics, start_step=start.start_step,
               resumed=checkpoint is not None, last_saved=start.start_step if checkpoint is not None else None,
               lr_schedule=cfg.lr_schedule, pixel_stats=pixel_stats)


@dataclass
class ResolvedOptions:
    """What the automatic options resolved to at the run's start (a resume keeps them)."""

    grow_every: int  # the pyramid's steps between levels
    real_batches: list[tuple[int | None, str]]  # per backbone: real rows per step (None: all) and why
    grey: bool
    record: dict[str, Any]  # as config.json and the checkpoint's run identity record them


def grows(cfg: DistillConfig) -> bool:
    """Only a pyramid started from grey or noise grows (from real images it starts complete)."""
    return cfg.param == "pyramid" and cfg.init not in REAL_INITS


def resolve_options(cfg: DistillConfig, splits: list[Any], saved_state: dict[str, Any] | None,
                    device: torch.device) -> ResolvedOptions:
    """--grow-every, --real-batch and --colour as this run takes them; `saved_state`: the checkpoint a
    resume continues, whose --grow-every auto is kept. The pyramid schedule is checked here, before
    anything is loaded."""
    resolution, num_classes = splits[0].resize_size, splits[0].store.num_classes
    grow_every = (auto_grow_every(resolution, cfg.steps) if parse_grow_every(cfg.grow_every) == "auto"
                  else int(cfg.grow_every))
    saved_grow_every = saved_state["run"].get("grow_every") if saved_state is not None else None
    if parse_grow_every(cfg.grow_every) == "auto" and isinstance(saved_grow_every, int) \
            and not isinstance(saved_grow_every, bool) and saved_grow_every >= 1:
        # --grow-every auto is fixed when a run starts (from its first --steps) and recorded: a resume
        # with a larger --steps extends that schedule instead of changing it mid-run.
        grow_every = saved_grow_every
    if grows(cfg):
        problem = check_schedule(resolution, grow_every, cfg.steps)  # before anything is loaded
        if problem is not None:
            raise DistillError(problem)
    real_batches = [plan_real_batch(parse_real_batch(cfg.real_batch), split.num_valid, num_classes, split.dim,
                                    cfg.ipc * cfg.augs * num_classes, device.type) for split in splits]
    grey = cfg.colour == "grey" or (cfg.colour == "auto" and all(split.greyscale for split in splits))
    record = {"grow_every": grow_every if grows(cfg) else None, "colour": "grey" if grey else "rgb",
              "real_batch": ["full" if batch is None else batch for batch, _ in real_batches]}
    return ResolvedOptions(grow_every=grow_every, real_batches=real_batches, grey=grey, record=record)


def check_image_size(cfg: DistillConfig, splits: list[Any]) -> None:
    if cfg.image_size is not None and cfg.image_size != splits[0].image_size:
        raise DistillError(f"the store's {splits[0].backbone}/{cfg.split} features were computed at "
                           f"{splits[0].image_size} px, not --image-size {cfg.image_size}: omit --image-size, or "
                           f"build a store at that size")


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
        if not torch.equal(other.rows, data.rows):  # open_splits checked the samples: a damaged store
            raise DistillError(f"{split.backbone}/{split.split_name} and {splits[0].backbone}/"
                               f"{splits[0].split_name} list their rows in another order: rebuild one of them")
        features = other.features.double()
        spread = torch.zeros(())
        for c in other.labels.unique():
            members = features[other.labels == c]
            spread += ((members - members.mean(0)) ** 2).sum()
        parts.append(features / (spread / len(features)).sqrt().clamp_min(1e-12))
    return torch.cat(parts, dim=1).float().numpy(), data


def real_init_images(splits: list, num_classes: int, ipc: int, resolution: int, generator: torch.Generator,
                     init: str = "real") -> Tensor:
    """ipc real images per class (canonical, at the synthetic resolution), class by class: random ones
    (`real`), or (`centroid`) the one whose stored view-0 features are nearest the class mean (the pick of
    `engine baseline --kind centroid`), with ipc > 1 the nearest of each of ipc k-means centres; with
    several backbones, in their joint features (`_init_features`)."""
    from engine.baselines import pick_cluster_centroids

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
        return split.canonical_images(torch.cat(picks), resolution)
    except UserError as exc:
        raise DistillError(f"--init {init} reads {len(picks) * ipc} real images from the store's source: "
                           f"{one_line(exc)}; make the source readable again, or start from grey images with "
                           f"--init zero") from None


def new_synthetic(cfg: DistillConfig, splits: list[Any], options: ResolvedOptions,
                  generators: dict[str, torch.Generator], resuming: bool, device: torch.device) -> SyntheticImages:
    """The synthetic images at step 0: from real images (--init real / centroid, drawn from the init
    stream), grey or noise. On resume their values are overwritten by the checkpoint: no draw, no reads."""
    num_classes, resolution = splits[0].store.num_classes, splits[0].resize_size
    if not resuming and cfg.init in REAL_INITS:
        init_images = real_init_images(splits, num_classes, cfg.ipc, resolution, generators["init"], cfg.init)
    elif resuming:
        init_images = torch.zeros(num_classes * cfg.ipc, 3, resolution, resolution)
    else:
        init_images = None
    return make_synthetic(cfg.param, num_classes, cfg.ipc, resolution,
                          init="real" if cfg.init in REAL_INITS else cfg.init, real_images=init_images,
                          grow_every=options.grow_every, channels=1 if options.grey else 3,
                          decorrelate=cfg.decorrelate, generator=generators["init"], device=device)


def pixel_statistics(cfg: DistillConfig, splits: list[Any], checkpoint: dict[str, Any] | None, out: Path,
                     ctx: DistContext) -> PixelStatistics | None:
    """--pixel-prior: the real images' pixel statistics, read once at the start; a resume takes the
    checkpoint's (no reads, and the same targets even if the source changed since). Rank 0 alone adds the
    prior (engine.distill.pixel_prior), so the other ranks hold none."""
    if not cfg.pixel_prior or not ctx.is_main:
        return None
    if checkpoint is not None:
        if "pixel_statistics" not in checkpoint:
            raise DistillError(f"{out / CHECKPOINT_FILE} holds no pixel statistics although its run used "
                               f"--pixel-prior: it is damaged; start a new run in another --out")
        return PixelStatistics.from_state_dict(checkpoint["pixel_statistics"]).to(ctx.device)
    return real_pixel_statistics(splits[0], splits[0].store.num_classes, splits[0].resize_size).to(ctx.device)


@dataclass
class StartState:
    """Where the optimization stands: the optimizer, the steps done, their metrics and the lr schedule."""

    optimizer: torch.optim.Optimizer
    start_step: int
    metrics: list[dict[str, Any]]
    lr_history: list[dict[str, Any]]


def fresh_start(synthetic: SyntheticImages, lr: float) -> StartState:
    return StartState(optimizer=adam(synthetic.parameters(), lr), start_step=0, metrics=[],
                    lr_history=[{"from_step": 0, "lr": lr}])


def restored_start(checkpoint: dict[str, Any], synthetic: SyntheticImages, generators: dict[str, torch.Generator],
                     lr: float, out: Path, main: bool) -> StartState:
    """The images, optimizer, generators and metrics as the checkpoint saved them; a changed --lr (the
    way out of a diverged run) applies from the checkpoint's step and is recorded."""
    try:
        synthetic.load_state_dict(checkpoint["synthetic"])
        optimizer = adam(synthetic.parameters(), lr)
        load_adam_state(optimizer, checkpoint["optimizer"])
        for name, gen in generators.items():
            gen.set_state(checkpoint["generators"][name])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DistillError(f"{out / CHECKPOINT_FILE} does not fit this run ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]}); start a new run in another --out") from None
    start_step = int(checkpoint["step"])
    lr_history = list(checkpoint.get("lr_history") or [{"from_step": 0, "lr": checkpoint["optimizer"]
                                                        ["param_groups"][0]["lr"]}])
    if lr_history[-1]["lr"] != lr:
        lr_history.append({"from_step": start_step, "lr": lr})
        for group in optimizer.param_groups:
            group["lr"] = lr
        if main:
            print(f"note: --lr {lr_history[-2]['lr']} -> {lr} from step {start_step}", file=sys.stderr)
    return StartState(optimizer=optimizer, start_step=start_step, metrics=list(checkpoint["metrics"]),
                    lr_history=lr_history)


def size_passes(cfg: DistillConfig, ctx: DistContext, store, members: list[Member],
                synthetic: SyntheticImages) -> list[range]:
    """Each member's copies per backbone pass (--chunk) for this rank's share of the copies, and its
    --eval-every quick probe; returns every rank's share of the copies of a step."""
    copies_per_step = members[0].side.copies(synthetic.n)
    shares = [contiguous_share(copies_per_step, r, ctx.world_size) for r in range(ctx.world_size)]
    for member in members:
        member.copies_per_pass, member.pass_info = resolve_copies_per_pass(
            parse_chunk(cfg.chunk), member.side, synthetic, copies=max(1, len(shares[ctx.rank])))
        if cfg.eval_every:
            member.quick_probe = member_quick_probe(cfg, ctx, store, member, synthetic)
        if cfg.lr_schedule == "plateau":
            member.fit = member_fit(cfg, ctx, store, member, synthetic)
    return shares


def run_config(cfg: DistillConfig, ctx: DistContext, store, objective: Objective, members: list[Member],
               synthetic: SyntheticImages, options: ResolvedOptions, start: StartState, lr: float, resumed: bool,
               shares: list[range]) -> dict[str, Any]:
    """What config.json records about the run at its start (`finish` adds the outcome)."""
    device, resolution = ctx.device, members[0].split.resize_size
    copies_per_step = members[0].side.copies(synthetic.n)
    config = {
        "arguments": cfg.to_json(),
        "method": cfg.method,
        "objective": objective.config(),
        "seeds": {"seed": cfg.seed, **{f"{k}_generator": derived_seed(cfg.seed, k) for k in GENERATORS}},
        "store": {"path": store_id(cfg.store), "dataset": store.dataset, "split": cfg.split,
                  "rows": members[0].real.num_rows},
        "backbones": [_member_record(m, copies_per_step) for m in members],
        "synthetic": {**synthetic.describe(), "num_images": synthetic.n, "ipc": cfg.ipc,
                      "full_resolution_from_step": (pyramid_full_step(resolution, options.grow_every)
                                                    if grows(cfg) else 0)},
        "augmentation": {"enabled": cfg.augment, **AugmentConfig().to_json(), "synthetic_copies": members[0].side.augs},
        "optimizer": {"name": "Adam", "lr": lr, "lr_option": cfg.lr, "lr_history": start.lr_history,
                      "lr_schedule": cfg.lr_schedule,
                      "reset_on_pyramid_growth": cfg.param == "pyramid"},
        "device": str(device), "amp": "bf16 autocast (backbone forward)" if device.type == "cuda" else "fp32",
        "class_names": store.class_names, "class_folders": class_folder_names(store.class_names),
        "tool_version": tool_version(), "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "resumed_from_step": start.start_step if resumed else None,
        "resolved": options.record,  # what the automatic options resolved to at the run's start
    }
    if ctx.is_distributed:
        config["distributed"] = {"world_size": ctx.world_size, "backend": ctx.backend,
                                 "copies_per_rank": [len(share) for share in shares],
                                 "note": "device, chunk and peak memory are rank 0's"}
    return config


def _member_record(m: Member, copies_per_step: int) -> dict[str, Any]:
    return {
        "name": m.backbone.name, "weight": m.weight, "fingerprint": m.backbone.fingerprint,
        "image_size": m.backbone.image_size, "resize_size": m.backbone.resize_size,
        "weights_path": m.backbone.weights_path,
        "store": {"fingerprint": m.split.fingerprint, "views": m.split.views, "dtype": m.split.attrs.get("dtype")},
        "real": {**m.real.describe(), "plan": m.real_batch_note,
                 "batch_resolved": "full" if m.real.batch is None else min(m.real.batch, m.real.num_rows)},
        "chunk": {"copies_per_pass": m.copies_per_pass, "copies_per_step": copies_per_step, **m.pass_info},
    }
