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
import errno
import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import zarr
import zarr.errors
from torch.utils.data import DataLoader

from . import schema
from .progress import progress
from .runtime import describe_os_error, exclusive_lock
from .store import (Damage, FeatureStore, StoreLocation, StoreSplit, open_zarr_group,
                    read_root_metadata, store_location)
from .backbones import Backbone, create_backbone, get_spec
from .datasets import DatasetWarning, ImageDataset, dataset_splits, open_dataset
from .options import option
from .distributed import (DistContext, all_reduce_int, broadcast_object, contiguous_share, destroy,
                          init_process_group_from_env, raise_if_any_failed)
from .errors import StoreError, UserError
from .schema import DEFAULT_CHUNK_ROWS, DTYPES
from .views import ViewDataset, collate_views


# Upper bounds of the numeric options (BuildConfig.validate). Views: each is a backbone pass per image;
# a batch or a chunk (one work unit, buffered in float32) beyond these would not fit any machine's memory.
MAX_VIEWS = 1024
MAX_BATCH_SIZE = 1 << 16
MAX_CHUNK_ROWS = 1 << 20
MAX_INT32 = 2**31 - 1
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**63 - 1  # torch and numpy generators take seeds below 2**64; the views' seed string any


def max_workers() -> int:
    """Decoding processes per build process: four per CPU (at least 32) is far past any gain."""
    return max(32, 4 * (os.cpu_count() or 1))


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
    repair: bool = option(False, "check the existing splits as `fs verify` does and recompute only their "
                                 "damaged units (then merge the class statistics again)", flag="--repair")

    def validate(self) -> None:
        """Options that are wrong whatever is on disk: one line each. Every number has an upper bound too,
        so that a typo of many digits is one line instead of a hang, a fork storm or an OverflowError."""
        bounds = (("views", 1, MAX_VIEWS), ("batch_size", 1, MAX_BATCH_SIZE), ("chunk_rows", 1, MAX_CHUNK_ROWS),
                  ("workers", 0, max_workers()), ("limit_per_class", 1, MAX_INT32), ("image_size", 1, MAX_IMAGE_SIZE),
                  ("seed", 0, MAX_SEED))
        for name, low, high in bounds:
            value = getattr(self, name)
            if value is None:
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{flag} must be an integer, got {value!r}")
            if value < low:
                raise UserError(f"{flag} must be >= {low}, got {value}")
            if value > high:
                raise UserError(f"{flag} must be at most {high}, got {value}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
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


def _write_error(where: str, exc: OSError) -> StoreError:
    """An OSError while writing the store as one line saying what to do; the store stays usable: chunks
    are replaced atomically and a unit's marker is written last, so a rerun resumes."""
    detail, _first = describe_os_error(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free disk space, then rerun the same command (finished units are kept, the build resumes)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the store writable or pass another --store; rerun to resume"
    else:
        hint = "fix the cause, then rerun the same command (finished units are kept, the build resumes)"
    return StoreError(f"cannot write to store {where} ({detail}): {hint}")


@contextlib.contextmanager
def _store_writes(where: str) -> Iterator[None]:
    """Turn OSErrors of store writes (disk full, permissions, read-only file system) into StoreError."""
    try:
        yield
    except OSError as exc:
        raise _write_error(where, exc) from None


def _check_writable(location: StoreLocation, backbone: str) -> None:
    """Before any heavy work: a local store must be creatable or writable (StoreError, one line, else).
    Remote (fsspec) stores report permissions only when written; their errors surface then."""
    path = location.local_path
    if path is None:
        return
    probe = path
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == path:
            raise StoreError(f"{path} is a file, not a feature store: pass --store a folder path")
        raise StoreError(f"cannot create store {path}: {probe} is a file, not a folder; pass --store a path "
                         f"inside a folder")
    folders = [probe] if probe != path else [path, path / backbone]
    for folder in folders:
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            action = "create the store in" if probe != path else "write to"
            raise StoreError(f"cannot {action} {folder}: permission denied (read-only folder or file system); "
                             f"make it writable or pass another --store")


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

    def __init__(self, group: zarr.Group, ds: ImageDataset, attrs: dict[str, Any], where: str = "") -> None:
        self.group = group
        self.where = where  # the store, for messages
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
        if schema.UNIT_COLOUR in group:  # stores from before colour was recorded lack it
            self.arrays[schema.UNIT_COLOUR] = group[schema.UNIT_COLOUR]
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
        self.colour = False

    def add(self, indices: np.ndarray, features: np.ndarray | None, failed: list[tuple[int, str]],
            colour: bool = False) -> None:
        self.colour |= colour
        if len(indices):
            local = indices - self.start_row
            self.features[local] = features if self.views > 1 else features[:, 0]
            self.labels[local] = self.ds.labels[indices]
        self.skipped.extend(failed)

    def finish(self) -> None:
        """Write every chunk of the unit, its partial statistics, then (last) its marker."""
        a, k, lo, hi = self.arrays, self.unit, self.start_row, self.stop_row
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked right below
            stored = self.features.astype(self.np_dtype)
        valid = self.labels != schema.SKIPPED_LABEL
        # Readers take non-finite features of an image row for damage; never write any.
        if not np.isfinite(stored[valid]).all():
            if np.isfinite(self.features[valid]).all():
                raise StoreError(f"features of {self.ds.split} rows {lo}-{hi - 1} exceed the float16 range: "
                                 f"rebuild with --dtype fp32 (into another --store)")
            raise StoreError(f"the backbone produced non-finite features for {self.ds.split} rows {lo}-{hi - 1}: "
                             f"check its --weights")
        with _store_writes(self.where):
            self._write(a, k, lo, hi, stored, valid)
        self.unit = None

    def _write(self, a: dict[str, zarr.Array], k: int, lo: int, hi: int, stored: np.ndarray,
               valid: np.ndarray) -> None:
        a[schema.FEATURES][lo:hi] = stored
        a[schema.LABELS][lo:hi] = self.labels
        a[schema.SAMPLE_IDS][lo:hi] = np.array(self.ds.sample_ids[lo:hi], dtype=object).astype(str)
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
        if schema.UNIT_COLOUR in a:
            a[schema.UNIT_COLOUR][k] = int(self.colour)
        a[schema.UNIT_DONE][k] = 1  # the completion marker: written last


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
    greyscale = (not bool(np.asarray(group[schema.UNIT_COLOUR][:]).any())) if schema.UNIT_COLOUR in group else None
    group.attrs.update({
        "greyscale": greyscale,  # every image grey (R = G = B); None: not recorded (an older store)
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


def _close_inherited_locks(paths: tuple[str, ...], worker_id: int) -> None:  # noqa: ARG001 - worker_init_fn
    """DataLoader worker_init_fn: close the descriptors of the build lock a forked worker inherited. A
    flock lasts while any process holds a descriptor of it, and workers notice their parent's death only
    seconds later: a killed build would keep its store locked (naming a dead pid) until they exit."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:  # no /proc (not Linux): the lock lasts until the workers exit
        return
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in paths:
                os.close(int(fd))
        except OSError:
            pass


def _compute_units(backbone: Backbone, ds: ImageDataset, writer: _UnitWriter, units: list[int], *,
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
                        worker_init_fn=functools.partial(_close_inherited_locks, lock_paths) if lock_paths else None,
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
class _Prepared:
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


def _prepare(cfg: BuildConfig, location: StoreLocation, device: torch.device, is_main: bool = True) -> _Prepared:
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
        _check_writable(location, spec.name)

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
    return _Prepared(location, datasets, model, wanted, existing, needs_write=needs_write, repairs=repairs,
                     notes=notes)


def _lock_dir(location: StoreLocation, backbone: str, shard_rank: int, shard_world: int) -> Path:
    """The folder whose `.lock` a build holds: one per (backbone, shard), so the `--shard i/n` processes
    of one job (which write disjoint units) run concurrently while a second copy of any of them stops."""
    assert location.local_path is not None
    name = backbone if shard_world == 1 else f"{backbone}.shard-{shard_rank}-of-{shard_world}"
    return location.local_path / ".locks" / name


def _create_and_plan(prep: _Prepared, shard_rank: int, shard_world: int,
                     chunk_rows_explicit: bool) -> dict[str, list[int] | None]:
    """Create the root group, the split groups and every array at full size (whatever is missing), clear
    the markers of the units --repair found damaged, and return per split the unfinished units of this
    shard, in order (None: the split is already complete). Run by one process per process group (rank
    0), before the other ranks touch the store."""
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
        damages = prep.repairs.get(ds.split, [])
        if prep.existing.get(ds.split, {}).get("complete", False) and not damages:
            plan[ds.split] = None
            continue
        group = _require_group(bb_group, ds.split, attrs)
        stored_attrs = dict(group.attrs)
        schema.check_split_compatible(f"{location} {bb_name}/{ds.split}", stored_attrs, attrs, chunk_rows_explicit)
        for name, spec in schema.array_specs(stored_attrs, ds.num_classes).items():
            _require_array(group, name, spec)
        if damages:
            # `complete` goes first: from here until the merge no reader trusts the split. Cleared markers
            # send the damaged units down the normal resume path, which rewrites every chunk of a unit.
            group.attrs["complete"] = False
            for unit in sorted({d.unit for d in damages if d.unit is not None}):
                group[schema.UNIT_DONE][unit] = 0
        try:
            done = np.asarray(group[schema.UNIT_DONE][:])
        except Exception as exc:  # noqa: BLE001 - a damaged marker chunk (codec errors vary)
            raise StoreError(f"{location} {bb_name}/{ds.split} unit_done is damaged ({exc.__class__.__name__}): "
                             f"rerun with --repair (`fs verify --store {location}` lists the damage)") from None
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


def _build_locked(ctx: DistContext, cfg: BuildConfig, location: StoreLocation, workers: int, prep: _Prepared,
                  held: contextlib.ExitStack) -> BuildReport:
    error: Exception | None = None
    model, bb_name = prep.model, prep.model.name
    shard_rank, shard_world = parse_shard(cfg.shard)

    # 2. Rank 0 alone takes the build lock (one process of a group is enough: the others write only after
    #    it planned), creates groups and arrays (pre-sized once) and lists the unfinished units; the
    #    collective after it is the barrier the other ranks wait at before opening the store.
    plan: dict[str, list[int] | None] | None = None
    lock_paths: tuple[str, ...] = ()
    if ctx.is_main:
        try:
            with _store_writes(location.url):
                # fsspec (object) stores have no flock: concurrent builds there are the user's to avoid.
                if prep.needs_write and location.local_path is not None:
                    lock = held.enter_context(exclusive_lock(_lock_dir(location, bb_name, shard_rank, shard_world),
                                                             f"feature store {location}: the build lock"))
                    lock_paths = (os.path.realpath(lock),)
                plan = _create_and_plan(prep, shard_rank, shard_world, cfg.chunk_rows is not None)
        except Exception as exc:  # noqa: BLE001 - see above
            error = exc
    raise_if_any_failed(error)
    plan = broadcast_object(plan)
    assert plan is not None

    # 3. Every rank computes its contiguous share of each split's unfinished units; 4. rank 0 merges.
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
            writer = _UnitWriter(group, ds, dict(group.attrs), where=location.url)
            written = _compute_units(model, ds, writer, mine, batch_size=cfg.batch_size, workers=workers,
                                     device=ctx.device, seed=cfg.seed, views=cfg.views,
                                     quiet=cfg.quiet or not ctx.is_main, desc=desc, lock_paths=lock_paths)
        except Exception as exc:  # noqa: BLE001 - see above
            error = exc
        raise_if_any_failed(error)  # also the barrier: every rank's units are written
        if ctx.is_main:
            try:
                with _store_writes(location.url):
                    finalize_split(group, ds.class_names)
            except Exception as exc:  # noqa: BLE001 - see above
                error = exc
        raise_if_any_failed(error)  # every rank sees the merged statistics from here on
        written = all_reduce_int(written)
        final_attrs = dict(group.attrs)
        damages = prep.repairs.get(ds.split, [])
        report.splits.append(SplitResult(
            split=ds.split, rows=attrs["num_images"], written=written,
            skipped=int(final_attrs.get("num_skipped", 0)), already_complete=False,
            complete=bool(final_attrs.get("complete", False)),
            units_done=int(np.count_nonzero(group[schema.UNIT_DONE][:])), units_total=int(attrs["num_units"]),
            empty_classes=list(final_attrs.get("empty_classes", [])),
            repaired_units=sorted({d.unit for d in damages if d.unit is not None}),
            repaired_statistics=any(d.unit is None for d in damages)))
    return report
