"""A feature store opened for reading (`FeatureStore.open(path)`): a Zarr v3 group of frozen-backbone
features of a labelled image dataset, one `<backbone>/<split>` group per split (`StoreSplit`).

The layout, attributes and array specifications are in `featurestore.schema`; where a store lives in
`featurestore.location`; reading a split in `featurestore.reading`; the checks a read and `verify` share
in `featurestore.checks`. The names of those modules are re-exported here, the store's public import path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import zarr

from .checks import Damage, describe_read_error
from .errors import StoreError
from .location import (StoreLocation, child_names, open_child, open_zarr_group, read_root_metadata,
                       store_location)
from .reading import SplitData, StoreSplit

__all__ = ["FeatureStore", "StoreSplit", "SplitData", "Damage", "StoreLocation", "store_location", "open_store",
           "read_root_metadata", "open_zarr_group", "child_names", "open_child", "describe_read_error"]


class FeatureStore:
    """A feature store opened for reading. `FeatureStore.open(path)`."""

    def __init__(self, location: StoreLocation, root: zarr.Group) -> None:
        self.location = location
        # A Path for local stores (as before URLs were supported), the URL string otherwise.
        self.path: Path | str = location.local_path if location.local_path is not None else location.url
        self.root = root
        self.attrs: dict[str, Any] = dict(root.attrs)

    @classmethod
    def open(cls, path: "str | os.PathLike | StoreLocation") -> "FeatureStore":
        """Open a store for reading: a local folder or any fsspec URL (s3://bucket/fs, memory://fs, ...)."""
        location = store_location(path)
        if read_root_metadata(location) is None:
            raise StoreError(f"no feature store at {location}: build one with "
                             f"`fs build DATASET --backbone NAME --store {location}`")
        return cls(location, open_zarr_group(location, read_only=True))

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, dataset={self.dataset!r}, backbones={self.backbones()})"

    @property
    def dataset(self) -> str:
        return str(self.attrs["dataset"]["name"])

    @property
    def limit_per_class(self) -> int | None:
        return self.attrs["dataset"].get("limit_per_class")

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.attrs["class_names"])

    def class_names_problem(self, split_classes: Any = None) -> str | None:
        """What is wrong with the root's class_names (a list of distinct strings, as many as the split's
        arrays hold classes: `split_classes`, its num_classes attribute), or None."""
        names = self.attrs.get("class_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            return f"the root attribute class_names is not a list of strings ({str(names)[:60]!r})"
        repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if repeated is not None:
            return f"the root attribute class_names repeats {repeated!r}"
        if split_classes is not None and split_classes != len(names):
            return f"the root attribute lists {len(names)} class names but its arrays hold {split_classes} classes"
        return None

    def child_groups(self, *parts: str) -> list[tuple[str, zarr.Group]]:
        """(name, group) of the child groups under `parts`, one at a time (see `child_names`); a child
        whose zarr.json is damaged raises StoreError naming it."""
        parent = self.root
        for part in parts:
            parent = parent[part]
        out = []
        for name in child_names(self.location, *parts):
            node = open_child(self.location, parent, name, "split group" if parts else "backbone group")
            if isinstance(node, zarr.Group):
                out.append((name, node))
        return out

    def backbones(self) -> list[str]:
        return [name for name, _ in self.child_groups()]

    def splits(self, backbone: str, complete_only: bool = False) -> list[str]:
        """Splits stored for `backbone` (train and val first); [] if the backbone is absent."""
        if backbone not in self.backbones():
            return []
        names = [name for name, group in self.child_groups(backbone)
                 if not complete_only or group.attrs.get("complete", False)]
        return sorted(names, key=lambda s: ({"train": 0, "val": 1}.get(s, 2), s))

    def _holdings(self) -> str:
        parts = []
        for bb in self.backbones():
            for sp, group in sorted(self.child_groups(bb), key=lambda item: ({"train": 0, "val": 1}.get(item[0], 2),
                                                                          item[0])):
                done = group.attrs.get("complete", False)
                parts.append(f"{bb}/{sp}" + ("" if done else " (incomplete)"))
        return ", ".join(parts) if parts else "nothing yet"

    def split(self, backbone: str, split: str, allow_incomplete: bool = False) -> StoreSplit:
        """The `<backbone>/<split>` group; StoreError (naming what the store holds) if absent or incomplete."""
        from .backbones import get_spec

        name = backbone
        if backbone not in self.backbones():
            try:  # accept registry aliases ("dinov2" -> "dinov2-vitb14")
                name = get_spec(backbone).name
            except Exception:  # noqa: BLE001 - unknown names fall through to the message below
                pass
        if name not in self.backbones() or split not in self.splits(name):
            root = self.attrs.get("dataset", {}).get("root") if isinstance(self.attrs.get("dataset"), dict) else None
            data_root = f" --data-root {root}" if root else ""  # the command must find the same images
            raise StoreError(f"store {self.path} has no {backbone}/{split}; it holds: {self._holdings()}. "
                             f"Build it with `fs build {self.dataset} --backbone {backbone} --split {split} "
                             f"--store {self.path}{data_root}`")
        sp = StoreSplit(self, name, split, open_child(self.location, self.root[name], split, "split group"))
        problem = self.class_names_problem(sp.attrs.get("num_classes"))
        if problem is not None:
            raise StoreError(f"store {self.path} is damaged: {problem} ({name}/{split}); rebuild the store")
        if not sp.complete and not allow_incomplete:
            raise StoreError(f"{name}/{split} in {self.path} is incomplete ({sp.units_done()}/"
                             f"{sp.attrs['num_units']} units): rerun the same `fs build` command to finish it")
        return sp

    def iter_splits(self) -> Iterator[StoreSplit]:
        """Every backbone/split group, complete or not."""
        for bb in self.backbones():
            groups = dict(self.child_groups(bb))
            for sp in self.splits(bb):
                yield StoreSplit(self, bb, sp, groups[sp])


def open_store(store: "str | os.PathLike | StoreLocation | FeatureStore") -> FeatureStore:
    """A FeatureStore from a path, URL or location; an already open one is returned as is."""
    return store if isinstance(store, FeatureStore) else FeatureStore.open(store)
