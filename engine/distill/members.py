"""The members of a run: one per --backbone, each its store split (the real side), its backbone pass of
the synthetic copies, its weight in the loss and, with --eval-every, its quick probe."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from engine.distill.backprop import SyntheticSide
from engine.distill.config import DistillConfig, DistillError
from engine.distill.feature_space import FeatureMap, feature_map
from engine.probe import QUICK_PROBE
from engine.real import ImageRealSource, RealSource, StoreRealSource
from featurestore.augment import AugmentConfig
from featurestore.distributed import DistContext


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
    real_batch_note: str = ""  # why the real side takes the batch it takes (`plan_real_batch`)
    quick_probe: Callable[[], float] | None = None  # --eval-every: top-1 of the current images (rank 0)
    fit: Callable[[], tuple[float, float]] | None = None  # --lr-schedule plateau: the images' fit (rank 0)
    features: FeatureMap | None = None  # --feature-space: the map both sides pass through (None: raw)

    @property
    def name(self) -> str:
        return self.split.backbone


def open_splits(cfg: DistillConfig, store) -> list[Any]:
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


def make_members(cfg: DistillConfig, ctx: DistContext, splits: list[Any],
                 real_batches: list[tuple[int | None, str]]) -> list[Member]:
    """One member per split: its backbone (fingerprint checked against the store), its real side with the
    batch `real_batches` gives it (rows, why), its share of the loss. Rank 0 says what the real side takes."""
    weights = cfg.backbone_weight or [1.0] * len(splits)
    members = []
    for split, (real_batch, real_batch_note), weight in zip(splits, real_batches, weights):
        backbone = split.open_backbone(ctx.device, weights=cfg.weights)
        if cfg.real_source == "store":
            real: RealSource = StoreRealSource.from_split(split, batch=real_batch, augment_views=cfg.augment,
                                                          device=ctx.device)
        else:
            real = ImageRealSource.from_split(split, backbone, batch=real_batch, augment_images=cfg.augment)
        members.append(Member(split=split, backbone=backbone, real=real, weight=weight / sum(weights),
                              side=SyntheticSide(backbone, cfg.augs, cfg.augment, AugmentConfig()),
                              real_batch_note=real_batch_note, features=feature_map(cfg.feature_space, split, ctx.device)))
        if ctx.is_main and not cfg.quiet:
            prefix = "" if len(splits) == 1 else f"{split.backbone}: "
            print(prefix + real_batch_note, file=sys.stderr)
            if getattr(real, "note", None):
                print(f"{prefix}real side: {real.note}", file=sys.stderr)
    return members


QUICK_PROBE_NOTE = (f"--eval-every: {QUICK_PROBE}, tested on the store's val features: a cheap "
                    "estimate; `engine eval` runs the full protocol")


def member_quick_probe(cfg: DistillConfig, ctx: DistContext, store, member: Member,
                       synthetic) -> Callable[[], float] | None:
    """The --eval-every quick probe of the current images on one backbone (rank 0 only; None on other ranks).
    It draws from its own generators, so a run's trajectory is the same with or without it."""
    from engine.evaluate import quick_probe

    val_split = store.split(member.name, "val")  # a missing val split: one line naming what there is
    if not ctx.is_main:
        return None
    val = val_split.load(view=0, device=ctx.device)
    return _on_current_images(synthetic, lambda images: quick_probe(
        member.backbone, images, synthetic.labels, val.features, val.labels, store.num_classes, seed=cfg.seed))


def member_fit(cfg: DistillConfig, ctx: DistContext, store, member: Member,
               synthetic) -> Callable[[], tuple[float, float]] | None:
    """--lr-schedule plateau: the fit (cross-entropy, top-1 %) of the current images on at most
    PLATEAU.rows of this backbone's train features, evenly spaced (rank 0 only; None on other ranks). The
    rows come from the real side when it holds stored features (no second read of the split), else from
    the store. Its own generators: the run's draws are the same with or without it."""
    from engine.distill.config import PLATEAU, evenly_spaced
    from engine.evaluate import set_fit

    if not ctx.is_main:
        return None
    if isinstance(member.real, StoreRealSource):
        keep = evenly_spaced(member.real.num_rows, PLATEAU.rows)
        if len(keep) == member.real.num_rows:  # every row: a view, not a second copy of the real side
            features, labels = member.real.features[:, 0], member.real.labels
        else:
            keep_d = torch.from_numpy(keep).to(member.real.device)
            features, labels = member.real.features[keep_d, 0], member.real.labels[keep_d]
    else:
        real = member.split.load(view=0, device=ctx.device, rows=evenly_spaced(member.split.n, PLATEAU.rows))
        features, labels = real.features, real.labels
    return _on_current_images(synthetic, lambda images: set_fit(
        member.backbone, images, synthetic.labels, features, labels, store.num_classes, seed=cfg.seed))


def _on_current_images(synthetic, score: Callable[[torch.Tensor], Any]) -> Callable[[], Any]:
    """`score` of the synthetic images as they are when called (no graph kept)."""
    def read() -> Any:
        with torch.no_grad():
            images = synthetic.images().detach()
        return score(images)

    return read
