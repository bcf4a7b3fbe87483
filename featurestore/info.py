"""`fs info`: what a feature store holds, as a JSON-able dict; `fs verify`: a full check of its data."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from .errors import StoreError
from .schema import FEATURES, rebuild_command
from .store import Damage, FeatureStore, StoreLocation, StoreSplit, child_names, open_child


def _local_size(path: Path) -> int:
    """Bytes of every file under `path` (what `du --apparent-size` would count)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # build locks are not store content
        for name in filenames:
            if name.startswith("."):
                continue
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:  # a file renamed away by a concurrent writer
                pass
    return total


def size_in_store(location: StoreLocation, *parts: str) -> int:
    """Bytes stored under `parts` of the store: file sizes for a local folder, object sizes (fsspec `du`)
    for a URL."""
    if location.local_path is not None:
        return _local_size(location.local_path.joinpath(*parts))
    fs, root = location.filesystem()
    try:
        return int(fs.du("/".join([root.rstrip("/"), *parts]), total=True))
    except FileNotFoundError:
        return 0
    except Exception as exc:  # noqa: BLE001 - remote backends: credentials, permissions, network
        raise StoreError(f"cannot list {location.child(*parts)} ({type(exc).__name__}: {exc}): check the "
                         f"--store URL and its credentials") from None


def _split_info(sp: StoreSplit, location: StoreLocation) -> dict[str, Any]:
    attrs = sp.attrs
    return {
        "n": sp.n,
        "limit_per_class": attrs.get("dataset", {}).get("limit_per_class"),
        "greyscale": sp.greyscale,
        "num_valid": sp.num_valid if sp.complete else None,
        "dim": sp.dim,
        "views": sp.views,
        "dtype": sp.dtype,
        "complete": sp.complete,
        "units_done": sp.units_done(),
        "units_total": int(attrs["num_units"]),
        "chunk_rows": int(attrs["chunk_rows"]),
        "full_cov": bool(attrs.get("full_cov", False)),
        "num_skipped": int(attrs.get("num_skipped", 0)),
        "skipped": sp.skipped,
        "empty_classes": list(attrs.get("empty_classes", [])),
        "size_bytes": size_in_store(location, sp.backbone, sp.split_name),
    }


def store_info(path: "str | os.PathLike | StoreLocation") -> dict[str, Any]:
    """Backbones, splits (N, D, views, dtype, completeness, skipped files), classes and size of a store
    (a local folder or an fsspec URL)."""
    store = FeatureStore.open(path)
    backbones: dict[str, Any] = {}
    for sp in store.iter_splits():
        bb = sp.attrs["backbone"]
        entry = backbones.setdefault(sp.backbone, {
            "fingerprint": bb["fingerprint"],
            "dim": bb["spec"]["dim"],
            "image_size": bb["image_size"],
            "resize_size": bb["resize_size"],
            "normalization": bb["normalization"]["name"],
            "weights_path": bb.get("weights_path"),
            "embedding": bb["spec"]["embedding"],
            "splits": {},
        })
        entry["splits"][sp.split_name] = _split_info(sp, store.location)
    return {
        "path": store.location.url,
        "schema_version": store.attrs["schema_version"],
        "tool_version": store.attrs.get("tool_version"),
        "dataset": dict(store.attrs["dataset"]),
        "num_classes": store.num_classes,
        "class_names": store.class_names,
        "size_bytes": size_in_store(store.location),
        "backbones": backbones,
    }


# ----------------------------------------------------------------------------------------------------
# fs verify


@dataclass
class SplitCheck:
    """The result of checking one backbone/split group."""

    backbone: str
    split: str
    complete: bool = False
    units_done: int = 0
    units_total: int = 0
    checksums: bool = False  # chunks carry CRC32C checksums (stores built before them do not)
    damages: list[Damage] = field(default_factory=list)
    repair: str = ""  # the `fs build ... --repair` command for this split

    @property
    def ok(self) -> bool:
        return self.complete and not self.damages


def _has_checksums(array: zarr.Array) -> bool:
    from zarr.codecs import Crc32cCodec

    return any(isinstance(codec, Crc32cCodec) for codec in getattr(array.metadata, "codecs", ()))


def verify_store(path: "str | os.PathLike | StoreLocation", backbone: str | None = None) -> list[SplitCheck]:
    """Check every split of the store (or of `backbone`) in full (`StoreSplit.verify`); read only. A split
    or backbone group whose metadata is unreadable is reported as an unrepairable damage of that split,
    and the others are still checked."""
    store = FeatureStore.open(path)
    location = store.location
    names = child_names(location)
    if backbone is not None:
        if backbone not in names:
            from .backbones import get_spec

            try:  # registry aliases ("dinov2" -> "dinov2-vitb14")
                backbone = get_spec(backbone).name
            except Exception:  # noqa: BLE001 - an unknown name: the message below
                pass
        if backbone not in names:
            raise StoreError(f"store {location} has no backbone {backbone}; it holds: "
                             f"{', '.join(names) or 'nothing yet'}")
        names = [backbone]
    dataset = dict(store.attrs.get("dataset", {}))
    checks: list[SplitCheck] = []
    for bb in names:
        try:
            bb_group = open_child(location, store.root, bb, "backbone group")
        except StoreError as exc:
            checks.append(SplitCheck(bb, "*", damages=[Damage(bb, "*", str(exc), repairable=False)]))
            continue
        if not isinstance(bb_group, zarr.Group):
            continue
        for name in child_names(location, bb):
            try:
                group = open_child(location, bb_group, name, "split group")
            except StoreError as exc:
                checks.append(SplitCheck(bb, name, damages=[Damage(bb, name, str(exc), repairable=False)]))
                continue
            if not isinstance(group, zarr.Group):
                continue
            sp = StoreSplit(store, bb, name, group)
            check = SplitCheck(bb, name, complete=sp.complete, units_done=sp.units_done(),
                               units_total=int(sp.attrs.get("num_units", 0)), damages=sp.verify(),
                               repair=rebuild_command(location.url, dataset, bb, sp.attrs, name))
            try:
                check.checksums = _has_checksums(group[FEATURES])
            except Exception:  # noqa: BLE001 - unreadable metadata is already a damage above
                pass
            checks.append(check)
    return checks
