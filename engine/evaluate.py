"""The linear-probe evaluation protocol (the LGM authors'), on any ImageFolder set, any stored backbone.

For an image set and an evaluation backbone:
1. The images (ImageFolder layout, class folders mapped to the store's classes) are resized to the
   backbone's `resize_size`, the size real canonical images have, so one set serves every backbone
   (cross-backbone transfer) whatever resolution it was distilled at.
2. A fresh linear probe (D -> C with bias; weights N(0, 0.01^2), bias 0, as the authors; drawn from the seed) is
   trained with flip + random-resized-crop augmentation through the frozen backbone. The backbone is
   frozen, so the features of augmented views are cached: `views` (default min(epochs, 100)) augmented
   views of every image are drawn with `augment` (no pixel noise: evaluation uses flip + RRC only) and
   embedded once per image set and backbone; at every epoch each image uses one of its cached views,
   drawn at random by the seed. The seeds share the pool of views (drawn from its own stream,
   `view_pool_seed`) and differ in head init, batch order and the view each image takes each epoch:
   with 100 views a pool per seed would add little but cost 5x the backbone passes. The 1000 epochs
   are then tiny matrix products, all seeds trained side by side.
   Optimizer, as the authors: Adam, lr = 1e-3 * bs / 256 with bs = min(100, N), cosine decay to 0 over
   epochs (stepped per epoch, as the authors), no weight decay, `epochs` = 1000.
3. Test on the store's `val` features (view 0 = the centre crop of the canonical image): no test
   image passes through a backbone. The evaluation backbone is rebuilt with the store's image size and
   weights and checked against the store's fingerprint, so train and test features come from one model.
4. Top-1 and top-5 (top-k with k = min(5, C)) in percent, per seed; tables give mean ± std over seeds
   (population std, numpy's default).

The full-data probe (`evaluate_full`) is the upper bound: the same probe recipe trained on the stored
train features (view 0, no augmentation, never touching images), `epochs` = 100 and bs = 128 (so
lr = 5e-4), as the authors' full-dataset row (src/config/full_dataset_config.py:12).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from engine.distill.outdir import CONFIG_FILE, IMAGES_DIR
from engine.eval_results import (  # noqa: F401 (re-exported: engine.evaluate is the evaluation's entry point)
    FULL_ROW, UNSEEN_COLUMN, CellResult, EvalResult, check_eval_out, write_eval_outputs)
from engine.imagesets import EVAL_AUGMENT, RUN_MARKERS, embed_views, read_image_set, resolve_image_dir
from engine.probe import MAX_BATCH, QUICK_RECIPE, QUICK_VIEWS, ProbeRecipe, probes_accuracy, train_probes
from featurestore.augment import resize
from featurestore.backbones import Backbone
from featurestore.errors import UserError
from featurestore.options import option
from featurestore.progress import progress
from featurestore.runtime import pick_device
from featurestore.store import open_store

DEFAULT_VIEWS = 100
FULL_BATCH = 128  # full-data probe: the authors' batch_size_per_gpu on one GPU (src/config/full_dataset_config.py)


# ----------------------------------------------------------------------------------------------------
# Image sets


def set_sources(path: str | os.PathLike) -> list[str]:
    """The backbones an image set was made with, from its run's record: a distill run's backbones, a
    centroid/neighbors baseline's ranking backbone; none for random real images or a plain folder.

    A record that does not parse as JSON, or lacks the field, is treated as unknown (every backbone
    unseen). A field that is there but malformed (`backbones` not a list of {"name": str} records) is a
    UserError, raised before any evaluation: it used to fail only when the table was written."""
    import json

    root = resolve_image_dir(path)
    run = root.parent if root.name == IMAGES_DIR else root
    for record_name in (CONFIG_FILE, "baseline.json"):
        record_path = run / record_name
        if not record_path.is_file():
            continue
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            return []  # an unreadable record: treated as unknown, every backbone unseen
        if not isinstance(record, dict):
            return []
        if record_name == "baseline.json":
            if record.get("kind") == "random" or "backbone" not in record:
                return []
            names, field = [record["backbone"]], "backbone"
        elif "backbones" in record:
            value = record["backbones"]
            names = ([b.get("name") if isinstance(b, dict) else None for b in value]
                     if isinstance(value, list) and value else [None])
            field = "backbones"
        elif isinstance(record.get("backbone"), dict) and "name" in record["backbone"]:  # runs before "backbones"
            names, field = [record["backbone"]["name"]], "backbone.name"
        else:
            return []
        if not all(isinstance(name, str) and name for name in names):
            shown = json.dumps(record.get(field.split(".")[0]))
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            form = "a non-empty list of {\"name\": \"<backbone>\", ...} records" if field == "backbones" else \
                "a backbone name"
            raise UserError(f"{record_path}: '{field}' must be {form}, got {shown}: fix the file, or remove it "
                            f"to evaluate the set as a plain image folder")
        return [str(name) for name in names]
    return []


# ----------------------------------------------------------------------------------------------------
# The protocol


# Upper bounds of the numeric options: far past any protocol (the authors': 5 seeds, 1000 epochs), so a
# typo of many digits is one line, not a list of 10^20 seeds or a cache of 10^20 views.
MAX_SEEDS = 10_000
MAX_EPOCHS = 10_000_000
MAX_VIEWS = 100_000


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {seeds}")
        if seeds > MAX_SEEDS:
            raise UserError(f"--seeds must be at most {MAX_SEEDS}, got {seeds}")
        return list(range(seeds))
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError("no seeds given")
    return seeds


def _recipe_text(recipe: ProbeRecipe, views: int | None) -> str:
    bs = "min(100, N)" if recipe.batch_size is None else str(recipe.batch_size)
    aug = f"flip + random resized crop, {views} cached views per image" if views else "no augmentation"
    init = "head N(0, 0.01^2), bias 0" if recipe.init == "normal" else "PyTorch's default uniform head init"
    return (f"{init}; Adam lr {recipe.base_lr:g}*bs/256, bs {bs}, cosine per epoch, {recipe.epochs} epochs, no "
            f"weight decay; {aug}; test on stored val features (centre crop)")


@dataclass
class EvalConfig:
    """The options of `engine eval` that `evaluate` takes (the CLI derives its options from them)."""

    seeds: int = option(5, "Probe runs per cell (seeds 0..N-1).")
    epochs: int = option(ProbeRecipe.epochs, "Probe epochs on an image set.")
    views: int | None = option(None, f"Cached augmented views per image and seed (default min(epochs, {DEFAULT_VIEWS})).")
    full: bool = option(False, "Add the full-data probe on the stored train features.", flag="--full")
    full_epochs: int = option(100, "Epochs of the full-data probe.")
    probe_init: str = option(ProbeRecipe.init, "Probe head init: normal (the authors': N(0, 0.01^2), zero bias) or "
                                                 "uniform (PyTorch's default, this tool's before 2026-11-29).")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    quiet: bool = option(False, "No progress bars.", flag="--quiet")


def quick_probe(backbone: Backbone, images: torch.Tensor, labels: torch.Tensor, val_features: torch.Tensor,
                val_labels: torch.Tensor, num_classes: int, seed: int = 0) -> float:
    """Top-1 (%) on the val features of a probe trained on `images` (at the backbone's resize size) with
    the QUICK recipe: the cheap, noisier version of the protocol above."""
    feats = embed_views(backbone, images, QUICK_VIEWS, torch.Generator().manual_seed(view_pool_seed([seed])))
    probes = train_probes(feats, labels.to(feats.device), num_classes, QUICK_RECIPE,
                          [torch.Generator().manual_seed(seed)])
    return probes_accuracy(probes, val_features, val_labels)[0][0]


# `engine distill --lr-schedule plateau`: the fit of the current images to the real data, read every 50 steps.
# The protocol's 1000 epochs (300 leave the head near its init: on Fashion-MNIST it scores
# 60-66 % where the protocol's probe scores 72-75 %, benchmarks/results/diag_fit_curve.md as of e1eb29f), 3 seeds
# averaged, on at most 100 cached views in all (10 per image for 10 images, 1 from 100 images up).
FIT_SEEDS = (0, 1, 2)
FIT_MAX_VIEWS = 100


def set_fit(backbone: Backbone, images: torch.Tensor, labels: torch.Tensor, features: torch.Tensor,
            feature_labels: torch.Tensor, num_classes: int, seed: int = 0) -> tuple[float, float]:
    """(cross-entropy, top-1 %) on `features` of the protocol's probes trained on `images`, mean over
    FIT_SEEDS (offset by `seed`): how well the set stands for the data `features` come from."""
    views = max(1, min(QUICK_VIEWS, FIT_MAX_VIEWS // max(1, images.shape[0])))
    feats = embed_views(backbone, images, views, torch.Generator().manual_seed(view_pool_seed([seed])))
    probes = train_probes(feats, labels.to(feats.device), num_classes, ProbeRecipe(),
                          [torch.Generator().manual_seed(seed + s) for s in FIT_SEEDS])
    targets = feature_labels.to(feats.device)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(logits, targets).item()
                  for logits in probes.logits(features.to(feats.device))]
    top1 = [a for a, _ in probes_accuracy(probes, features, feature_labels)]
    return sum(losses) / len(losses), sum(top1) / len(top1)


def evaluate_full(store, backbone: str, epochs: int = EvalConfig.full_epochs,
                  seeds: int | Sequence[int] = EvalConfig.seeds, device: str | torch.device = "auto",
                  quiet: bool = False, probe_init: str = EvalConfig.probe_init) -> CellResult:
    """The full-data probe: train on the stored train features (view 0), test on the val features."""
    store = open_store(store)
    dev = pick_device(device) if isinstance(device, str) else device
    train = store.split(backbone, "train").load(view=0, device=dev)
    val = store.split(backbone, "val").load(view=0, device=dev)
    recipe = ProbeRecipe(epochs=epochs, batch_size=FULL_BATCH, init=probe_init)
    seed_list = _seed_list(seeds)
    with progress(epochs, f"full probe {backbone} ({len(seed_list)} seeds)", "epoch", disable=quiet,
                  leave=False) as bar:
        gens = [torch.Generator().manual_seed(seed) for seed in seed_list]
        probes = train_probes(train.features, train.labels, store.num_classes, recipe, gens, bar)
    accs = probes_accuracy(probes, val.features, val.labels)
    return CellResult(seeds=seed_list, top1=[a for a, _ in accs], top5=[b for _, b in accs],
                      num_images=int(train.labels.shape[0]))


def view_pool_seed(seeds: Sequence[int]) -> int:
    """Seed of the cached augmented views of a run: its own stream, distinct from the probe seeds."""
    return 1_000_003 * (int(seeds[0]) + 1)


def _evaluate_set(model: Backbone, images: torch.Tensor, labels: torch.Tensor, val, num_classes: int,
                  seeds: list[int], n_views: int, recipe: ProbeRecipe, desc: str, quiet: bool) -> CellResult:
    n = images.shape[0]
    with progress(n_views * n, f"{desc}: views", "img", disable=quiet, leave=False) as bar:
        feats = embed_views(model, images, n_views, torch.Generator().manual_seed(view_pool_seed(seeds)), bar)
    with progress(recipe.epochs, f"{desc}: probe ({len(seeds)} seeds)", "epoch", disable=quiet,
                  leave=False) as bar:
        gens = [torch.Generator().manual_seed(seed) for seed in seeds]
        probes = train_probes(feats, labels, num_classes, recipe, gens, bar)
    accs = probes_accuracy(probes, val.features, val.labels)
    return CellResult(seeds=list(seeds), top1=[a for a, _ in accs], top5=[b for _, b in accs], num_images=n)


def evaluate(store, image_sets: Mapping[str, str | os.PathLike], backbones: Sequence[str],
             **options: Any) -> EvalResult:
    """Evaluate image sets (name -> ImageFolder dir) on each backbone; `options`: the fields of
    `EvalConfig` (`full` adds the full-data row; `views` cached augmented views per image and seed)."""
    cfg = EvalConfig(**options)
    store = open_store(store)
    if not backbones:
        raise UserError("give at least one --backbone to evaluate on")
    if not image_sets and not cfg.full:
        raise UserError("nothing to evaluate: give --images DIR (one or more) and/or --full")
    dev = pick_device(cfg.device) if isinstance(cfg.device, str) else cfg.device
    seed_list, n_views, recipe = _checked_protocol(cfg)
    # Validate everything before the long work: every backbone has usable train/val rows, every set reads.
    _check_splits(store, backbones, cfg.full)
    # The sets' records too: a malformed one would otherwise fail only when the table is written.
    sources = {name: set_sources(path) for name, path in image_sets.items()}
    loaded = {name: read_image_set(path, store.class_names) for name, path in image_sets.items()}

    result = EvalResult(backbones=list(backbones))
    result.config = _result_config(store, image_sets, backbones, loaded, cfg, seed_list, n_views, recipe, dev)
    for name, path in image_sets.items():
        result.rows[name] = {}
        result.sources[name] = sources[name]
    if cfg.full:
        result.rows[FULL_ROW] = {}
    for b in backbones:
        _evaluate_backbone(result, store, b, loaded, cfg, seed_list, n_views, recipe, dev)
    return result


def _checked_protocol(cfg: EvalConfig) -> tuple[list[int], int, ProbeRecipe]:
    """The seeds, the number of cached views and the probe recipe of `cfg`, each option checked (one line)."""
    seeds, epochs, views, full, full_epochs = cfg.seeds, cfg.epochs, cfg.views, cfg.full, cfg.full_epochs
    seed_list = _seed_list(seeds)
    if epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    if full and full_epochs < 1:
        raise UserError(f"--full-epochs must be at least 1, got {full_epochs} (an untrained probe is no upper bound)")
    if views is not None and views < 1:
        raise UserError(f"--views must be at least 1, got {views}")
    for flag, value, high in (("--epochs", epochs, MAX_EPOCHS), ("--full-epochs", full_epochs, MAX_EPOCHS),
                              ("--views", views, MAX_VIEWS)):
        if value is not None and value > high:
            raise UserError(f"{flag} must be at most {high}, got {value}")
    n_views = min(epochs, DEFAULT_VIEWS) if views is None else max(1, min(views, epochs))
    if cfg.probe_init not in ("normal", "uniform"):
        raise UserError(f"--probe-init must be normal or uniform, got {cfg.probe_init!r}")
    return seed_list, n_views, ProbeRecipe(epochs=epochs, init=cfg.probe_init)


def _check_splits(store, backbones: Sequence[str], full: bool) -> None:
    """Refuse (one line) a backbone whose val split (and train split, with --full) has no usable rows."""
    for b in backbones:
        for name in ("val", "train") if full else ("val",):
            split = store.split(b, name)
            if split.num_valid == 0:
                raise UserError(f"{split.backbone}/{name} of {store.path} has no usable rows (every sample was "
                                f"skipped): nothing to {'test on' if name == 'val' else 'train the full probe on'}")


def _result_config(store, image_sets: Mapping[str, str | os.PathLike], backbones: Sequence[str], loaded: dict,
                   cfg: EvalConfig, seed_list: list[int], n_views: int, recipe: ProbeRecipe, dev) -> dict:
    """The `config` of an evaluation's result: everything needed to reproduce it."""
    return {
        "store": str(getattr(store, "path", "")), "dataset": store.dataset, "num_classes": store.num_classes,
        "class_names": list(store.class_names), "backbones": list(backbones), "seeds": seed_list,
        "image_sets": {name: str(Path(path)) for name, path in image_sets.items()},
        "images_per_set": {name: int(s.labels.shape[0]) for name, s in loaded.items()},
        "epochs": cfg.epochs, "views": n_views, "base_lr": recipe.base_lr, "max_batch": MAX_BATCH,
        "augment": EVAL_AUGMENT.to_json(), "protocol": _recipe_text(recipe, n_views),
        "full": ({"epochs": cfg.full_epochs, "batch_size": FULL_BATCH, "features": "stored train view 0"}
                 if cfg.full else None),
        "device": str(dev),
    }


def _evaluate_backbone(result: EvalResult, store, b: str, loaded: dict, cfg: EvalConfig, seed_list: list[int],
                       n_views: int, recipe: ProbeRecipe, dev) -> None:
    """Fill backbone `b`'s column of `result`: every loaded set, then the full-data row with --full."""
    val_split = store.split(b, "val")
    result.config.setdefault("backbone_splits", {})[b] = {
        "image_size": val_split.image_size, "resize_size": val_split.resize_size,
        "fingerprint": val_split.fingerprint}
    if loaded:
        val = val_split.load(view=0, device=dev)
        model = val_split.open_backbone(dev)
        for name, image_set in loaded.items():
            images = resize(image_set.images, model.resize_size)
            result.rows[name][b] = _evaluate_set(model, images, image_set.labels, val, store.num_classes,
                                                 seed_list, n_views, recipe, f"{name} on {b}", cfg.quiet)
        del model
    if cfg.full:
        result.rows[FULL_ROW][b] = evaluate_full(store, b, epochs=cfg.full_epochs, seeds=seed_list, device=dev,
                                                 quiet=cfg.quiet, probe_init=cfg.probe_init)


def default_out_dir(image_dirs: Sequence[str | os.PathLike]) -> Path:
    """Where `engine eval` writes without --out: a distill/baseline run's own `eval/` folder for one run,
    `eval-<set>/` next to one plain image folder (so two sets in one folder keep their own results), and
    `./eval` for several sets."""
    if len(image_dirs) == 1:
        root = resolve_image_dir(image_dirs[0])
        if root.name == IMAGES_DIR and any((root.parent / m).is_file() for m in RUN_MARKERS):
            return root.parent / "eval"  # the images of a distill/baseline run: the run's own folder
        return root.parent / f"eval-{root.name}"
    return Path("eval")
