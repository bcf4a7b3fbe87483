"""Work units of a build: which units a shard and a rank take (`parse_shard`, `units_for_rank`), the
lock a build holds (`lock_dir`, `close_inherited_locks`), and creating the store's groups and arrays and
listing the unfinished units (`create_and_list_unfinished`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import zarr
import zarr.errors

from . import schema
from .distributed import contiguous_share
from .errors import StoreError, UserError
from .location import StoreLocation, open_zarr_group, read_root_metadata

if TYPE_CHECKING:
    from .build import Prepared


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


def units_for_rank(unfinished: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of the list of unfinished units. Slicing the *unfinished* list (not
    the range of all units) keeps a resumed run balanced whatever world size did the finished units."""
    return [unfinished[i] for i in contiguous_share(len(unfinished), rank, world)]


def lock_dir(location: StoreLocation, backbone: str, shard_rank: int, shard_world: int) -> Path:
    """The folder whose `.lock` a build holds: one per (backbone, shard), so the `--shard i/n` processes
    of one job (which write disjoint units) run concurrently while a second copy of any of them stops."""
    assert location.local_path is not None
    name = backbone if shard_world == 1 else f"{backbone}.shard-{shard_rank}-of-{shard_world}"
    return location.local_path / ".locks" / name


def close_inherited_locks(paths: tuple[str, ...], worker_id: int) -> None:  # noqa: ARG001 - worker_init_fn
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


def check_writable(location: StoreLocation, backbone: str) -> None:
    """Before any heavy work: a local store must be creatable or writable (StoreError, one line, else).
    Remote (fsspec) stores report permissions only when written; their errors surface then."""
    path = location.local_path
    if path is None:
        return
    existing = path  # the nearest part of the path that exists
    while not existing.exists() and not existing.is_symlink():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        if existing == path:
            raise StoreError(f"{path} is a file, not a feature store: pass --store a folder path")
        raise StoreError(f"cannot create store {path}: {existing} is a file, not a folder; pass --store a path "
                         f"inside a folder")
    folders = [existing] if existing != path else [path, path / backbone]
    for folder in folders:
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            action = "create the store in" if existing != path else "write to"
            raise StoreError(f"cannot {action} {folder}: permission denied (read-only folder or file system); "
                             f"make it writable or pass another --store")


def require_group(parent: zarr.Group, name: str, attributes: dict[str, Any]) -> zarr.Group:
    """Create a group if absent without ever overwriting (a concurrent shard may have just created it)."""
    if name not in parent:
        try:
            return parent.create_group(name, attributes=attributes, overwrite=False)
        except zarr.errors.ContainsGroupError:
            pass
    return parent[name]


def require_array(group: zarr.Group, name: str, spec: dict[str, Any]) -> zarr.Array:
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


def create_and_list_unfinished(prep: Prepared, shard_rank: int, shard_world: int,
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
    bb_group = require_group(root, bb_name, {})
    unfinished: dict[str, list[int] | None] = {}
    for ds in prep.datasets:
        attrs = prep.wanted[ds.split]
        damages = prep.repairs.get(ds.split, [])
        if prep.existing.get(ds.split, {}).get("complete", False) and not damages:
            unfinished[ds.split] = None
            continue
        group = require_group(bb_group, ds.split, attrs)
        stored_attrs = dict(group.attrs)
        schema.check_split_compatible(f"{location} {bb_name}/{ds.split}", stored_attrs, attrs, chunk_rows_explicit)
        for name, spec in schema.array_specs(stored_attrs, ds.num_classes).items():
            require_array(group, name, spec)
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
        unfinished[ds.split] = [u for u in contiguous_share(len(done), shard_rank, shard_world) if not done[u]]
    return unfinished
