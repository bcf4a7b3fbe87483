"""`fs build`: stream a labelled dataset through a frozen backbone into the feature store, resumably.

How a build is organised (the layout itself is described in `featurestore.store`):

- Rows are cut into work units of `chunk_rows` rows, one chunk of every per-row array. All arrays are
  created once at full size; a unit writes its chunks (features, labels, sample ids, its partial class
  statistics, its skipped list) and then its completion marker `unit_done[k]`, last. LocalStore writes
  every chunk file atomically (zarr >= 3.1.3), so a process killed at any moment leaves either a
  finished unit or one that the next run redoes from scratch, and the result is identical.
- Units are assigned to workers as contiguous ranges (`featurestore.distributed.contiguous_share`), never strided, so concurrent
  writers (`--shard i/n` processes, or ranks) own whole chunks. Whoever finds every marker set after its
  own units merges the per-unit float64 partial sums, in unit order, into the class statistics and sets
  `complete`; the merge depends only on the stored partials, so it is exact and idempotent.
- Under torchrun (or srun with MASTER_ADDR set) the processes form one process group: every rank checks
  the store read-only, rank 0 creates what is missing and lists the unfinished units, then (after that
  collective) each rank takes a contiguous slice of that *list* (`units_for_rank`), so a resumed run with
  another world size stays balanced; after a collective that says every rank is done, rank 0 merges.
  `--shard i/n` composes with it: the group then splits shard i's unfinished units.
- The store is a local folder (zarr LocalStore, atomic chunk writes) or any fsspec URL (zarr FsspecStore;
  object stores replace whole objects on write, so the same unit protocol holds).
- DataLoader batches never straddle a unit, so a unit's batches are the same whichever process (or
  resumed run) computes it: features do not depend on how the work was split.
- Decoding and resizing happen in DataLoader worker processes; augmented views (views 1..K-1) are drawn
  there too, each from its own generator seeded by (seed, sample index, view), so they are independent of
  batching and sharding.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Sequence

import numpy as np
import torch
import zarr
import zarr.errors
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import schema
from .store import StoreLocation, open_zarr_group, read_root_metadata, store_location
from .backbones import Backbone, create_backbone, get_spec
from .datasets import ImageDataset, dataset_splits, open_dataset
from .options import option
from .distributed import (DistContext, all_reduce_int, broadcast_object, contiguous_share, destroy,
                          init_process_group_from_env, raise_if_any_failed)
from .errors import StoreError, UserError
from .schema import DEFAULT_CHUNK_ROWS, DTYPES
from .views import ViewDataset, collate_views


@dataclass
class BuildConfig:
    """Every option of `fs build` (the CLI derives its options from these fields)."""

    dataset: str = option(help="dataset name (see `fs datasets`)", argument=True)
    backbone: str = option(help="backbone name (see `fs backbones`)", flag="--backbone,-b")
    store: str = option(help="feature store: a folder (created if missing) or an fsspec URL such as "
                             "s3://bucket/fs (needs s3fs)", flag="--store,-s")
    data_root: str | None = option(None, "dataset root folder")
    splits: list[str] = option(help="split to build (repeatable; default: all present)", flag="--split",
                               factory=list)
    limit_per_class: int | None = option(None, "first N samples of each class")
    image_size: int | None = option(None, "backbone input size in px (default: the backbone's)")
    weights: str | None = option(None, "local weights file for the backbone")
    views: int = option(1, "views per image: centre crop + views-1 seeded augmentations")
    dtype: str = option("fp16", "feature storage dtype: fp16 or fp32")
    full_cov: bool = option(False, "also store per-class D x D second moments", flag="--full-cov")
    chunk_rows: int | None = option(None, f"rows per chunk = work unit (default {DEFAULT_CHUNK_ROWS}; a resumed "
                                          f"split keeps its own)")
    batch_size: int = option(64, "images per backbone forward")
    workers: int | None = option(None, "decoding worker processes (default min(8, cpus))")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    seed: int = option(0, "seed of the augmented views")
    shard: str | None = option(None, "i/n: do only shard i of n (e.g. Slurm job arrays)")
    quiet: bool = option(False, "no progress bar", flag="--quiet,-q")

    def validate(self) -> None:
        """Options that are wrong whatever is on disk: one line each."""
        if self.views < 1:
            raise UserError(f"--views must be >= 1, got {self.views}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise UserError(f"--chunk-rows must be >= 1, got {self.chunk_rows}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        if len(set(self.splits)) != len(self.splits):
            raise UserError(f"--split repeated: {', '.join(self.splits)}")
        parse_shard(self.shard)


# ----------------------------------------------------------------------------------------------------
# Results


@dataclass
class SplitResult:
    split: str
    rows: int  # rows in the split (skipped samples included)
    written: int  # rows this call computed (all ranks of a torchrun launch together)
    skipped: int  # undecodable samples in the split (known once complete)
    already_complete: bool  # the split was complete before this call: nothing was done
    complete: bool  # complete after this call (False: other shards still have units to do)
    units_done: int
    units_total: int
    empty_classes: list[str] = field(default_factory=list)  # classes with no usable sample in the split


@dataclass
class BuildReport:
    store: str  # the local path or the URL
    dataset: str
    backbone: str
    fingerprint: str
    splits: list[SplitResult] = field(default_factory=list)
    rank: int = 0  # under torchrun: this process's rank (SplitResult.written counts all ranks)
    world_size: int = 1

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# Work assignment


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """'i/n' (0-based i) -> (i, n); None -> (0, 1)."""
    if shard is None:
        return 0, 1
    if isinstance(shard, tuple):
        rank, world = shard
    else:
        try:
            left, right = str(shard).split("/")
            rank, world = int(left), int(right)
        except ValueError:
            raise UserError(f"--shard must look like i/n (e.g. 0/4 for the first of 4 shards), got {shard!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"--shard {rank}/{world}: need n >= 1 and 0 <= i < n (shards are numbered from 0)")
    return rank, world


# ----------------------------------------------------------------------------------------------------
# Store creation and validation


def _require_group(parent: zarr.Group, name: str, attributes: dict[str, Any]) -> zarr.Group:
    """Create a group if absent without ever overwriting (a concurrent shard may have just created it)."""
    if name not in parent:
        try:
            return parent.create_group(name, attributes=attributes, overwrite=False)
        except zarr.errors.ContainsGroupError:
            pass
    return parent[name]


def _require_array(group: zarr.Group, name: str, spec: dict[str, Any]) -> zarr.Array:
    if name not in group:
        try:
            return group.create_array(name, overwrite=False, **spec)
        except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
            pass
    array = group[name]
    if tuple(array.shape) != tuple(spec["shape"]) or tuple(array.chunks) != tuple(spec["chunks"]):
        raise StoreError(f"{group.path}/{name} has shape {array.shape} / chunks {array.chunks}, expected "
                         f"{spec['shape']} / {spec['chunks']}: the store is damaged, use another --store")
    return array


# ----------------------------------------------------------------------------------------------------
# Writing units and finalizing


class _UnitWriter:
    """Buffers one unit's rows in float32 and writes it (marker last) once all its batches arrived."""

    def __init__(self, group: zarr.Group, ds: ImageDataset, attrs: dict[str, Any]) -> None:
        self.group = group
        self.ds = ds
        self.n = attrs["num_images"]
        self.dim = attrs["dim"]
        self.views = attrs["views"]
        self.chunk_rows = attrs["chunk_rows"]
        self.full_cov = attrs["full_cov"]
        self.np_dtype = np.dtype(attrs["dtype"])
        self.num_classes = ds.num_classes
        self.arrays = {name: group[name] for name in (
            schema.FEATURES, schema.LABELS, schema.SAMPLE_IDS, schema.UNIT_DONE, schema.UNIT_COUNT,
            schema.UNIT_SUM, schema.UNIT_SQSUM, schema.UNIT_SKIPPED)}
        if self.full_cov:
            self.arrays[schema.UNIT_OUTER] = group[schema.UNIT_OUTER]
        self.unit: int | None = None

    def start(self, unit: int) -> None:
        self.unit = unit
        self.start_row, self.stop_row = schema.unit_rows(unit, self.chunk_rows, self.n)
        rows = self.stop_row - self.start_row
        shape = (rows, self.dim) if self.views == 1 else (rows, self.views, self.dim)
        self.features = np.full(shape, np.nan, dtype=np.float32)
        self.labels = np.full(rows, schema.SKIPPED_LABEL, dtype=np.int64)
        self.skipped: list[tuple[int, str]] = []

    def add(self, indices: np.ndarray, features: np.ndarray | None, failed: list[tuple[int, str]]) -> None:
        if len(indices):
            local = indices - self.start_row
            self.features[local] = features if self.views > 1 else features[:, 0]
            self.labels[local] = self.ds.labels[indices]
        self.skipped.extend(failed)

    def finish(self) -> None:
        """Write every chunk of the unit, its partial statistics, then (last) its marker."""
        a, k, lo, hi = self.arrays, self.unit, self.start_row, self.stop_row
        a[schema.FEATURES][lo:hi] = self.features.astype(self.np_dtype)
        a[schema.LABELS][lo:hi] = self.labels
        a[schema.SAMPLE_IDS][lo:hi] = np.array(self.ds.sample_ids[lo:hi], dtype=object).astype(str)
        valid = self.labels != schema.SKIPPED_LABEL
        view0 = (self.features if self.views == 1 else self.features[:, 0]).astype(np.float64)[valid]
        labels = self.labels[valid]
        counts = np.bincount(labels, minlength=self.num_classes).astype(np.int64)
        present = np.flatnonzero(counts)
        sums = np.zeros((len(present), self.dim))
        sqsums = np.zeros((len(present), self.dim))
        outer = np.zeros((len(present), self.dim, self.dim)) if self.full_cov else None
        for j, c in enumerate(present):
            x = view0[labels == c]
            sums[j] = x.sum(axis=0)
            sqsums[j] = (x * x).sum(axis=0)
            if outer is not None:
                outer[j] = x.T @ x
        a[schema.UNIT_COUNT][k] = counts
        if len(present):
            a[schema.UNIT_SUM].set_orthogonal_selection((k, present, slice(None)), sums)
            a[schema.UNIT_SQSUM].set_orthogonal_selection((k, present, slice(None)), sqsums)
            if outer is not None:
                a[schema.UNIT_OUTER].set_orthogonal_selection((k, present, slice(None), slice(None)), outer)
        a[schema.UNIT_SKIPPED][k] = json.dumps(sorted(self.skipped)) if self.skipped else ""
        a[schema.UNIT_DONE][k] = 1  # the completion marker: written last
        self.unit = None


def finalize_split(group: zarr.Group, class_names: Sequence[str]) -> bool:
    """If every unit is done: merge per-unit partial sums into the class statistics and mark the split
    complete. Exact (float64 sums, fixed unit order) and idempotent. Returns whether it is complete."""
    attrs = dict(group.attrs)
    done = np.asarray(group[schema.UNIT_DONE][:])
    if not done.all():
        return False
    c, d = len(class_names), attrs["dim"]
    unit_count = np.asarray(group[schema.UNIT_COUNT][:], dtype=np.int64)
    counts = unit_count.sum(axis=0)
    sums, sqsums = np.zeros((c, d)), np.zeros((c, d))
    outer = np.zeros((c, d, d)) if attrs["full_cov"] else None
    for k in range(len(unit_count)):
        present = np.flatnonzero(unit_count[k])
        if not len(present):
            continue
        sums[present] += group[schema.UNIT_SUM].get_orthogonal_selection((k, present, slice(None)))
        sqsums[present] += group[schema.UNIT_SQSUM].get_orthogonal_selection((k, present, slice(None)))
        if outer is not None:
            outer[present] += group[schema.UNIT_OUTER].get_orthogonal_selection(
                (k, present, slice(None), slice(None)))
    denom = np.maximum(counts, 1).astype(np.float64)
    group[schema.CLASS_COUNT][:] = counts
    group[schema.CLASS_MEAN][:] = (sums / denom[:, None]).astype(np.float32)
    group[schema.CLASS_SQ_MEAN][:] = (sqsums / denom[:, None]).astype(np.float32)
    if outer is not None:
        group[schema.CLASS_SECOND_MOMENT][:] = (outer / denom[:, None, None]).astype(np.float32)

    skipped_rows: list[tuple[int, str]] = []
    for entry in group[schema.UNIT_SKIPPED][:]:
        if entry:
            skipped_rows.extend((int(row), str(reason)) for row, reason in json.loads(str(entry)))
    skipped_rows.sort()
    ids = group[schema.SAMPLE_IDS]
    skipped = [{"sample_id": str(ids[row]), "reason": reason} for row, reason in skipped_rows]
    group.attrs.update({
        "skipped": skipped,
        "num_skipped": len(skipped),
        "num_valid": int(attrs["num_images"]) - len(skipped),
        "empty_classes": [name for name, count in zip(class_names, counts) if count == 0],
        "complete": True,  # last: readers trust a split only once this is set
    })
    return True


# ----------------------------------------------------------------------------------------------------
# build()


def _default_workers(processes_per_node: int = 1) -> int:
    """Decoding workers per process: the node's CPUs shared among its ranks, at most 8 each."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, processes_per_node)))


def _compute_units(backbone: Backbone, ds: ImageDataset, writer: _UnitWriter, units: list[int], *,
                   batch_size: int, workers: int, device: torch.device, seed: int, views: int,
                   quiet: bool, desc: str) -> int:
    """Run the backbone over `units` (in order) and write each; returns rows computed."""
    if not units:
        return 0
    chunk_rows, n = writer.chunk_rows, writer.n
    batches: list[list[int]] = []
    batch_unit: list[int] = []
    unit_last_batch: dict[int, int] = {}
    for unit in units:
        lo, hi = schema.unit_rows(unit, chunk_rows, n)
        for start in range(lo, hi, batch_size):  # batches never straddle a unit
            batches.append(list(range(start, min(hi, start + batch_size))))
            batch_unit.append(unit)
        unit_last_batch[unit] = len(batches) - 1
    total = sum(len(b) for b in batches)
    loader = DataLoader(ViewDataset(ds, backbone.resize_size, backbone.image_size, views, seed),
                        batch_sampler=batches, num_workers=workers, collate_fn=collate_views,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if workers > 0 else None)
    bar = tqdm(total=total, desc=desc, unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True,
               smoothing=0.1)
    try:
        for b, (indices, images, failed) in enumerate(loader):
            unit = batch_unit[b]
            if writer.unit != unit:
                writer.start(unit)
            features = None
            if images is not None:
                # View 0 alone, then the augmented views: view 0 then matches a single-view build bit for
                # bit (same batch shapes through the backbone).
                parts = [backbone.embed(images[:, 0])[:, None]]
                if views > 1:
                    aug = backbone.embed(images[:, 1:].flatten(0, 1))
                    parts.append(aug.view(len(indices), views - 1, -1))
                features = torch.cat(parts, dim=1).cpu().numpy()
            writer.add(indices, features, failed)
            if b == unit_last_batch[unit]:
                writer.finish()
            bar.update(len(indices) + len(failed))
    finally:
        bar.close()
    return total


@dataclass
class _Prepared:
    """Everything a build needs that comes from reading, never writing: checked before any write."""

    location: StoreLocation
    datasets: list[ImageDataset]
    model: Backbone
    wanted: dict[str, dict[str, Any]]  # split -> attributes of the split group to create / resume
    existing: dict[str, dict[str, Any]]  # split -> attributes already stored for this backbone


def _prepare(cfg: BuildConfig, location: StoreLocation, device: torch.device) -> _Prepared:
    """Open the datasets, load the backbone, and check the store is compatible (read only)."""
    get_spec(cfg.backbone)  # unknown name: fail before opening datasets or loading weights
    split_names = list(cfg.splits) if cfg.splits else dataset_splits(cfg.dataset, cfg.data_root)
    datasets = [open_dataset(cfg.dataset, root=cfg.data_root, split=s, limit_per_class=cfg.limit_per_class)
                for s in split_names]
    for ds in datasets[1:]:
        if ds.class_names != datasets[0].class_names:
            raise UserError(f"splits {datasets[0].split} and {ds.split} of {cfg.dataset} have different classes")

    meta = read_root_metadata(location)
    if meta is not None:
        schema.check_root_compatible(location.url, meta, datasets[0])
    model = create_backbone(cfg.backbone, image_size=cfg.image_size, weights=cfg.weights, device=device)
    model.eval()
    bb_name = model.name
    wanted = {ds.split: schema.split_attrs(ds, model, views=cfg.views, dtype=cfg.dtype, full_cov=cfg.full_cov,
                                           chunk_rows=cfg.chunk_rows or DEFAULT_CHUNK_ROWS, seed=cfg.seed)
              for ds in datasets}
    existing: dict[str, dict[str, Any]] = {}
    if meta is not None:
        root_ro = open_zarr_group(location, read_only=True)
        if bb_name in root_ro:
            for name, group in root_ro[bb_name].groups():
                attrs = dict(group.attrs)
                if name in wanted:
                    existing[name] = attrs
                    if cfg.chunk_rows is None:  # resuming: the stored unit size, whatever the default is
                        wanted[name]["chunk_rows"] = attrs["chunk_rows"]
                        wanted[name]["num_units"] = attrs["num_units"]
                    schema.check_split_compatible(f"{location} {bb_name}/{name}", attrs, wanted[name],
                                                   cfg.chunk_rows is not None)
                else:
                    # Another split of the same backbone: it must come from the same model and resolution.
                    schema.check_backbone_compatible(f"{location} {bb_name}/{name}", attrs["backbone"], model.describe())
    return _Prepared(location, datasets, model, wanted, existing)


def _create_and_plan(prep: _Prepared, shard_rank: int, shard_world: int,
                     chunk_rows_explicit: bool) -> dict[str, list[int] | None]:
    """Create the root group, the split groups and every array at full size (whatever is missing), and
    return per split the unfinished units of this shard, in order (None: the split is already complete).
    Run by one process per process group (rank 0), before the other ranks touch the store."""
    location, first = prep.location, prep.datasets[0]
    bb_name = prep.model.name
    if read_root_metadata(location) is None:
        if location.local_path is not None:
            location.local_path.mkdir(parents=True, exist_ok=True)
        try:
            zarr.create_group(store=location.zarr_store(read_only=False), attributes=schema.root_attrs(first),
                              overwrite=False)
        except zarr.errors.ContainsGroupError:  # a concurrent --shard process created it first
            pass
        meta = read_root_metadata(location)
        if meta is None:
            raise StoreError(f"could not create a feature store at {location}: check that it is writable")
        schema.check_root_compatible(location.url, meta, first)
    root = open_zarr_group(location, read_only=False)
    bb_group = _require_group(root, bb_name, {})
    plan: dict[str, list[int] | None] = {}
    for ds in prep.datasets:
        attrs = prep.wanted[ds.split]
        if prep.existing.get(ds.split, {}).get("complete", False):
            plan[ds.split] = None
            continue
        group = _require_group(bb_group, ds.split, attrs)
        stored_attrs = dict(group.attrs)
        schema.check_split_compatible(f"{location} {bb_name}/{ds.split}", stored_attrs, attrs, chunk_rows_explicit)
        for name, spec in schema.array_specs(stored_attrs, ds.num_classes).items():
            _require_array(group, name, spec)
        done = np.asarray(group[schema.UNIT_DONE][:])
        plan[ds.split] = [u for u in contiguous_share(len(done), shard_rank, shard_world) if not done[u]]
    return plan


def units_for_rank(unfinished: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of the list of unfinished units. Slicing the *unfinished* list (not
    the range of all units) keeps a resumed run balanced whatever world size did the finished units."""
    return [unfinished[i] for i in contiguous_share(len(unfinished), rank, world)]


# A rank that finishes its units waits at a collective for the slowest one; builds run for hours, so the
# default process-group timeout (10 min NCCL, 30 min gloo) would kill a run over an ordinary straggler.
# A crashed rank does not leave the others waiting that long: torchrun (or srun --kill-on-bad-exit)
# stops the whole job.
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)


def build(dataset: str, backbone: str, store: str | os.PathLike, **options: Any) -> BuildReport:
    """Compute and store `backbone` features of `dataset` (all splits present by default) in `store`:
    a local folder or any fsspec URL (s3://bucket/fs, gs://..., memory://...). `options`: the other
    fields of `BuildConfig`.

    Resumable: a rerun skips finished units and finishes the rest. Launched by torchrun (or srun with
    MASTER_ADDR set), the processes join one process group: rank 0 creates the arrays, every rank
    computes a contiguous share of the unfinished units on cuda:LOCAL_RANK (or the CPU), and rank 0
    merges the class statistics once all are done. With `shard="i/n"` (independent processes, e.g. a
    Slurm job array) this process, or process group, does only its contiguous share of every split's
    units; the one that completes the last unit (or any later run) merges the class statistics.
    `chunk_rows` defaults to 1024 for a new split and to the stored value when resuming. Every check
    runs before anything is written: a refused build changes nothing.
    """
    cfg = BuildConfig(dataset=dataset, backbone=backbone, store=os.fspath(store), **options)
    cfg.validate()
    location = store_location(store)
    ctx = init_process_group_from_env(cfg.device, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        workers = _default_workers(ctx.env.local_world_size) if cfg.workers is None else cfg.workers
        return _build(ctx, cfg, location, workers)
    finally:
        destroy(ctx)


def _build(ctx: DistContext, cfg: BuildConfig, location: StoreLocation, workers: int) -> BuildReport:
    # 1. Every rank: read-only checks. All ranks agree before anyone writes (one failing = all stop).
    prep: _Prepared | None = None
    error: Exception | None = None
    try:
        prep = _prepare(cfg, location, ctx.device)
    except Exception as exc:  # noqa: BLE001 - re-raised on this rank by raise_if_any_failed
        error = exc
    raise_if_any_failed(error)
    assert prep is not None

    # 2. Rank 0 alone creates groups and arrays (pre-sized once) and lists the unfinished units; the
    #    collective after it is the barrier the other ranks wait at before opening the store.
    plan: dict[str, list[int] | None] | None = None
    if ctx.is_main:
        try:
            plan = _create_and_plan(prep, *parse_shard(cfg.shard), cfg.chunk_rows is not None)
        except Exception as exc:  # noqa: BLE001 - see above
            error = exc
    raise_if_any_failed(error)
    plan = broadcast_object(plan)
    assert plan is not None

    # 3. Every rank computes its contiguous share of each split's unfinished units; 4. rank 0 merges.
    model, bb_name = prep.model, prep.model.name
    shard_rank, shard_world = parse_shard(cfg.shard)
    report = BuildReport(store=location.url, dataset=cfg.dataset, backbone=bb_name, fingerprint=model.fingerprint,
                         rank=ctx.rank, world_size=ctx.world_size)
    root = open_zarr_group(location, read_only=False)
    for ds in prep.datasets:
        attrs = prep.wanted[ds.split]
        unfinished = plan[ds.split]
        if unfinished is None:
            stored = prep.existing[ds.split]
            n_units = attrs["num_units"]
            report.splits.append(SplitResult(split=ds.split, rows=attrs["num_images"], written=0,
                                             skipped=int(stored.get("num_skipped", 0)),
                                             already_complete=True, complete=True,
                                             units_done=n_units, units_total=n_units,
                                             empty_classes=list(stored.get("empty_classes", []))))
            continue
        group = root[bb_name][ds.split]
        mine = units_for_rank(unfinished, ctx.rank, ctx.world_size)
        desc = f"{bb_name}/{ds.split}"
        if shard_world > 1:
            desc += f" shard {shard_rank}/{shard_world}"
        if ctx.is_distributed:  # only rank 0 draws a bar: its share, the same size as every other rank's
            desc += f" rank 0 of {ctx.world_size}"
        written = 0
        try:
            written = _compute_units(model, ds, _UnitWriter(group, ds, dict(group.attrs)), mine,
                                     batch_size=cfg.batch_size, workers=workers, device=ctx.device, seed=cfg.seed,
                                     views=cfg.views, quiet=cfg.quiet or not ctx.is_main, desc=desc)
        except Exception as exc:  # noqa: BLE001 - see above
            error = exc
        raise_if_any_failed(error)  # also the barrier: every rank's units are written
        if ctx.is_main:
            try:
                finalize_split(group, ds.class_names)
            except Exception as exc:  # noqa: BLE001 - see above
                error = exc
        raise_if_any_failed(error)  # every rank sees the merged statistics from here on
        written = all_reduce_int(written)
        final_attrs = dict(group.attrs)
        report.splits.append(SplitResult(
            split=ds.split, rows=attrs["num_images"], written=written,
            skipped=int(final_attrs.get("num_skipped", 0)), already_complete=False,
            complete=bool(final_attrs.get("complete", False)),
            units_done=int(np.count_nonzero(group[schema.UNIT_DONE][:])), units_total=int(attrs["num_units"]),
            empty_classes=list(final_attrs.get("empty_classes", []))))
    return report
