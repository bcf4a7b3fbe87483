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
- Reliability: every check (options, dataset, backbone, store compatibility, that a local store can be
  written at all) runs before the first write. A local build then holds an exclusive lock per (backbone,
  shard) (`<store>/.locks/`, flock: released when the process dies), so a second identical build stops
  with one line naming the holder instead of redoing the same work; `--shard` processes of one job lock
  different files and still write concurrently, and under torchrun rank 0 holds it for the group. An
  OSError while writing (disk full, permissions) becomes one StoreError line; chunks are written
  atomically and a unit's marker last, so the next run resumes. `--repair` runs `StoreSplit.verify`,
  clears the markers of the damaged units (and the split's `complete`), recomputes only those units and
  merges the class statistics again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader

from . import schema
from .backbones import Backbone, create_backbone, get_spec
from .build_config import BuildConfig
from .datasets import DatasetWarning, ImageDataset, dataset_splits, open_dataset
from .distributed import (DistContext, all_reduce_int, broadcast_object, destroy, if_a_rank_stops,
                          init_process_group_from_env, raise_if_any_failed)
from .errors import StoreError, UserError
from .progress import progress
from .runtime import exclusive_lock
from .schema import DEFAULT_CHUNK_ROWS
from .statistics import finalize_split
from .store import Damage, FeatureStore, StoreLocation, StoreSplit, open_zarr_group, read_root_metadata, store_location
from .unit_writer import UnitWriter, store_writes
from .units import (check_writable, close_inherited_locks, create_and_list_unfinished, lock_dir, parse_shard,
                    units_for_rank)
from .views import ViewDataset, collate_views

# The public import path of the build's names (tests, the CLI and users import them from here).
__all__ = ["build", "BuildConfig", "BuildReport", "SplitResult", "parse_shard", "units_for_rank", "finalize_split",
           "PROCESS_GROUP_TIMEOUT"]


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
    repaired_units: list[int] = field(default_factory=list)  # --repair: damaged units cleared and recomputed
    repaired_statistics: bool = False  # --repair: the class statistics were damaged and merged again


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
# Computing units


def _default_workers(processes_per_node: int = 1) -> int:
    """Decoding workers per process: the node's CPUs shared among its ranks, at most 8 each."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, processes_per_node)))


def _compute_units(backbone: Backbone, ds: ImageDataset, writer: UnitWriter, units: list[int], *,
                   batch_size: int, workers: int, device: torch.device, seed: int, views: int,
                   quiet: bool, desc: str, lock_paths: tuple[str, ...] = ()) -> int:
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
                        worker_init_fn=functools.partial(close_inherited_locks, lock_paths) if lock_paths else None,
                        prefetch_factor=4 if workers > 0 else None)
    bar = progress(total, desc, unit="img", disable=quiet)  # plain lines every 30 s when not a terminal
    try:
        for b, (indices, images, failed) in enumerate(loader):
            unit = batch_unit[b]
            if writer.unit != unit:
                writer.start(unit)
            features = None
            colour = False
            if images is not None:
                centre = images[:, 0]
                colour = bool((centre[:, 0] != centre[:, 1]).any() or (centre[:, 1] != centre[:, 2]).any())
                # View 0 alone, then the augmented views: view 0 then matches a single-view build bit for
                # bit (same batch shapes through the backbone).
                parts = [backbone.embed(images[:, 0])[:, None]]
                if views > 1:
                    aug = backbone.embed(images[:, 1:].flatten(0, 1))
                    parts.append(aug.view(len(indices), views - 1, -1))
                features = torch.cat(parts, dim=1).cpu().numpy()
            writer.add(indices, features, failed, colour)
            if b == unit_last_batch[unit]:
                writer.finish()
            bar.update(len(indices) + len(failed))
    finally:
        bar.close()
    return total


@dataclass
class Prepared:
    """Everything a build needs that comes from reading, never writing: checked before any write."""

    location: StoreLocation
    datasets: list[ImageDataset]
    model: Backbone
    wanted: dict[str, dict[str, Any]]  # split -> attributes of the split group to create / resume
    existing: dict[str, dict[str, Any]]  # split -> attributes already stored for this backbone
    needs_write: bool = True  # False: every wanted split is complete and nothing is to be repaired
    repairs: dict[str, list[Damage]] = field(default_factory=dict)  # --repair: split -> what verify found
    notes: list[str] = field(default_factory=list)  # the datasets' listing warnings, deduplicated


def _open_existing(location: StoreLocation, meta: dict[str, Any] | None) -> FeatureStore | None:
    return None if meta is None else FeatureStore(location, open_zarr_group(location, read_only=True))


def _prepare(cfg: BuildConfig, location: StoreLocation, device: torch.device, is_main: bool = True) -> Prepared:
    """Open the datasets, check the store can be written, load the backbone, check the store is compatible
    and (with --repair, on the main process) find its damaged units. Read only."""
    spec = get_spec(cfg.backbone)  # unknown name: fail before opening datasets or loading weights
    split_names = list(cfg.splits) if cfg.splits else dataset_splits(cfg.dataset, cfg.data_root)
    datasets = [open_dataset(cfg.dataset, root=cfg.data_root, split=s, limit_per_class=cfg.limit_per_class)
                for s in split_names]
    for ds in datasets[1:]:
        if ds.class_names != datasets[0].class_names:
            raise UserError(f"splits {datasets[0].split} and {ds.split} of {cfg.dataset} have different classes")
    notes = list(dict.fromkeys(note for ds in datasets for note in ds.warnings))

    meta = read_root_metadata(location)
    if meta is not None:
        schema.check_root_compatible(location.url, meta, datasets[0])
    store = _open_existing(location, meta)
    # Write access matters only if something will be written: a complete store may sit on a read-only disk.
    # Checked before the backbone loads and anything is decoded.
    stored = dict(store.child_groups(spec.name)) if store is not None and spec.name in store.backbones() else {}
    needs_write = cfg.repair or any(not (ds.split in stored and stored[ds.split].attrs.get("complete", False))
                                    for ds in datasets)
    if needs_write:
        check_writable(location, spec.name)

    model = create_backbone(cfg.backbone, image_size=cfg.image_size, weights=cfg.weights, device=device)
    model.eval()
    bb_name = model.name
    wanted = {ds.split: schema.split_attrs(ds, model, views=cfg.views, dtype=cfg.dtype, full_cov=cfg.full_cov,
                                           chunk_rows=cfg.chunk_rows or DEFAULT_CHUNK_ROWS, seed=cfg.seed)
              for ds in datasets}
    existing: dict[str, dict[str, Any]] = {}
    repairs: dict[str, list[Damage]] = {}
    for name, group in stored.items():
        attrs = dict(group.attrs)
        if name in wanted:
            existing[name] = attrs
            if cfg.chunk_rows is None:  # resuming: the stored unit size, whatever the default is
                wanted[name]["chunk_rows"] = attrs["chunk_rows"]
                wanted[name]["num_units"] = attrs["num_units"]
            schema.check_split_compatible(f"{location} {bb_name}/{name}", attrs, wanted[name],
                                           cfg.chunk_rows is not None,
                                           will_write=cfg.repair or not attrs.get("complete", False))
            if cfg.repair and is_main:
                assert store is not None
                damages = StoreSplit(store, bb_name, name, group).verify()
                fatal = [d for d in damages if not d.repairable]
                if fatal:
                    raise StoreError(f"{location} {bb_name}/{name} cannot be repaired unit by unit: "
                                     f"{fatal[0].line()}")
                if damages:
                    repairs[name] = damages
        else:
            # Another split of the same backbone: it must come from the same model and resolution.
            schema.check_backbone_compatible(f"{location} {bb_name}/{name}", attrs["backbone"], model.describe())
    needs_write = any(not existing.get(ds.split, {}).get("complete", False) for ds in datasets) or bool(repairs)
    return Prepared(location, datasets, model, wanted, existing, needs_write=needs_write, repairs=repairs,
                     notes=notes)


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
    # Another rank that stops ends this one at its next collective (PeerLostError, one line).
    lost = if_a_rank_stops(lambda: f"the units finished in {location} are intact (each is written whole, its "
                                   f"marker last): rerun the same command to resume the build")
    try:
        with lost:
            workers = _default_workers(ctx.env.local_world_size) if cfg.workers is None else cfg.workers
            return _build(ctx, cfg, location, workers)
    finally:
        destroy(ctx)


def _build(ctx: DistContext, cfg: BuildConfig, location: StoreLocation, workers: int) -> BuildReport:
    # 1. Every rank: read-only checks. All ranks agree before anyone writes (one failing = all stop).
    prep: Prepared | None = None
    error: Exception | None = None
    try:
        prep = _prepare(cfg, location, ctx.device, is_main=ctx.is_main)
    except Exception as exc:  # noqa: BLE001 - re-raised on this rank by raise_if_any_failed
        error = exc
    raise_if_any_failed(error)
    assert prep is not None
    if ctx.is_main:
        for note in prep.notes:  # the CLI shows each as one `warning:` line on stderr
            warnings.warn(note, DatasetWarning, stacklevel=3)
    with contextlib.ExitStack() as held:
        return _build_locked(ctx, cfg, location, workers, prep, held)


def _build_locked(ctx: DistContext, cfg: BuildConfig, location: StoreLocation, workers: int, prep: Prepared,
                  held: contextlib.ExitStack) -> BuildReport:
    error: Exception | None = None
    model, bb_name = prep.model, prep.model.name
    shard_rank, shard_world = parse_shard(cfg.shard)

    # 2. Rank 0 alone takes the build lock (one process of a group is enough: the others write only after
    #    it listed the units), creates groups and arrays (pre-sized once) and lists the unfinished units;
    #    the collective after it is the barrier the other ranks wait at before opening the store.
    unfinished: dict[str, list[int] | None] | None = None
    lock_paths: tuple[str, ...] = ()
    if ctx.is_main:
        try:
            with store_writes(location.url):
                # fsspec (object) stores have no flock: concurrent builds there are the user's to avoid.
                if prep.needs_write and location.local_path is not None:
                    lock = held.enter_context(exclusive_lock(lock_dir(location, bb_name, shard_rank, shard_world),
                                                             f"feature store {location}: the build lock"))
                    lock_paths = (os.path.realpath(lock),)
                unfinished = create_and_list_unfinished(prep, shard_rank, shard_world, cfg.chunk_rows is not None)
        except Exception as exc:  # noqa: BLE001 - see above
            error = exc
    raise_if_any_failed(error)
    unfinished = broadcast_object(unfinished)
    assert unfinished is not None

    # 3. Every rank computes its contiguous share of each split's unfinished units; 4. rank 0 merges.
    report = BuildReport(store=location.url, dataset=cfg.dataset, backbone=bb_name, fingerprint=model.fingerprint,
                         rank=ctx.rank, world_size=ctx.world_size)
    root = open_zarr_group(location, read_only=False)
    for ds in prep.datasets:
        if unfinished[ds.split] is None:
            report.splits.append(_already_complete(prep, ds.split))
        else:
            report.splits.append(_build_split(ctx, cfg, location, workers, prep, ds, root[bb_name][ds.split],
                                              unfinished[ds.split], lock_paths))
    return report


def _already_complete(prep: Prepared, split: str) -> SplitResult:
    attrs, stored = prep.wanted[split], prep.existing[split]
    n_units = attrs["num_units"]
    return SplitResult(split=split, rows=attrs["num_images"], written=0, skipped=int(stored.get("num_skipped", 0)),
                       already_complete=True, complete=True, units_done=n_units, units_total=n_units,
                       empty_classes=list(stored.get("empty_classes", [])))


def _build_split(ctx: DistContext, cfg: BuildConfig, location: StoreLocation, workers: int, prep: Prepared,
                 ds: ImageDataset, group: zarr.Group, unfinished: list[int], lock_paths: tuple[str, ...]) -> SplitResult:
    """This rank's share of the split's unfinished units, then (rank 0) the merge of its statistics."""
    error: Exception | None = None
    attrs, bb_name = prep.wanted[ds.split], prep.model.name
    shard_rank, shard_world = parse_shard(cfg.shard)
    mine = units_for_rank(unfinished, ctx.rank, ctx.world_size)
    desc = f"{bb_name}/{ds.split}"
    if shard_world > 1:
        desc += f" shard {shard_rank}/{shard_world}"
    if ctx.is_distributed:  # only rank 0 draws a bar: its share, the same size as every other rank's
        desc += f" rank 0 of {ctx.world_size}"
    written = 0
    try:
        writer = UnitWriter(group, ds, dict(group.attrs), where=location.url)
        written = _compute_units(prep.model, ds, writer, mine, batch_size=cfg.batch_size, workers=workers,
                                 device=ctx.device, seed=cfg.seed, views=cfg.views,
                                 quiet=cfg.quiet or not ctx.is_main, desc=desc, lock_paths=lock_paths)
    except Exception as exc:  # noqa: BLE001 - see above
        error = exc
    raise_if_any_failed(error)  # also the barrier: every rank's units are written
    if ctx.is_main:
        try:
            with store_writes(location.url):
                finalize_split(group, ds.class_names)
        except Exception as exc:  # noqa: BLE001 - see above
            error = exc
    raise_if_any_failed(error)  # every rank sees the merged statistics from here on
    written = all_reduce_int(written)
    final_attrs = dict(group.attrs)
    damages = prep.repairs.get(ds.split, [])
    return SplitResult(
        split=ds.split, rows=attrs["num_images"], written=written,
        skipped=int(final_attrs.get("num_skipped", 0)), already_complete=False,
        complete=bool(final_attrs.get("complete", False)),
        units_done=int(np.count_nonzero(group[schema.UNIT_DONE][:])), units_total=int(attrs["num_units"]),
        empty_classes=list(final_attrs.get("empty_classes", [])),
        repaired_units=sorted({d.unit for d in damages if d.unit is not None}),
        repaired_statistics=any(d.unit is None for d in damages))
