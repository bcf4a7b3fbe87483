"""Reading a feature store (a Zarr v3 group of frozen-backbone features of a labelled image dataset), and
where a store lives.

The layout, attributes and array specifications are in `featurestore.schema`.

A store is a local folder (zarr LocalStore) or any fsspec URL such as s3://bucket/fs (zarr FsspecStore;
the backend package, e.g. s3fs, is an optional dependency): see `StoreLocation`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import zarr
import zarr.abc.store
import zarr.storage

from .errors import StoreError
from .runtime import tool_version
from .schema import (CLASS_COUNT, CLASS_MEAN, CLASS_SECOND_MOMENT, CLASS_SQ_MEAN, FEATURES, LABELS, SAMPLE_IDS,
                     SCHEMA_VERSION, SKIPPED_LABEL, UNIT_DONE)

# ----------------------------------------------------------------------------------------------------
# Where a store lives: a local folder (zarr LocalStore) or any fsspec URL (zarr FsspecStore)

# pathlib collapses "//": Path("s3://bucket/fs") is "s3:/bucket/fs". Callers that wrapped a URL in a Path
# still mean the URL, so a Path starting with a known fsspec protocol and ":/" is read back as one.
_COLLAPSED_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):/(?!/)(.*)$")


@dataclass(frozen=True)
class StoreLocation:
    """A feature store's address. Local folders (plain paths or file:// URLs) use zarr's LocalStore,
    which writes every chunk atomically; anything else (s3://, gs://, memory://, ...) goes through
    fsspec and zarr's FsspecStore. Storage options (endpoints, credentials) come from fsspec's own
    configuration: environment variables such as FSSPEC_S3_ENDPOINT_URL, or ~/.config/fsspec/*.json."""

    url: str  # as shown to the user: the local path, or the URL
    protocol: str  # "file" for local folders
    local_path: Path | None  # the folder, for local stores

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    def __str__(self) -> str:
        return self.url

    def filesystem(self) -> tuple[Any, str]:
        """(fsspec filesystem, path inside it) for metadata, existence and size checks."""
        import fsspec.core

        if self.local_path is not None:
            return fsspec.filesystem("file"), str(self.local_path)
        try:
            return fsspec.core.url_to_fs(self.url)
        except ImportError as exc:  # fsspec: "Install s3fs to access S3"
            raise StoreError(f"store {self.url}: no fsspec backend for {self.protocol}:// is installed "
                             f"({exc}): install it (s3fs for s3://, gcsfs for gs://, adlfs for az://)") from None
        except ValueError as exc:
            raise StoreError(f"store {self.url}: {exc}; pass a local folder or an fsspec URL "
                             f"(s3://bucket/path, gs://bucket/path, ...)") from None

    def zarr_store(self, *, read_only: bool) -> zarr.abc.store.Store:
        if self.local_path is not None:
            return zarr.storage.LocalStore(str(self.local_path), read_only=read_only)
        self.filesystem()  # a missing backend or bad URL: one clear StoreError
        return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)

    def child(self, *parts: str) -> str:
        """Display form of a path inside the store (for messages)."""
        return "/".join([self.url.rstrip("/"), *parts])


def store_location(store: "str | os.PathLike | StoreLocation") -> StoreLocation:
    """Parse what a user passed as --store (or to FeatureStore.open): a path or an fsspec URL."""
    from fsspec.registry import known_implementations
    from fsspec.utils import get_protocol

    if isinstance(store, StoreLocation):
        return store
    text = os.fspath(store)
    if isinstance(store, PurePath):
        collapsed = _COLLAPSED_URL.match(text)
        if collapsed and collapsed.group(1).lower() in known_implementations \
                and collapsed.group(1).lower() not in ("file", "local"):
            text = f"{collapsed.group(1)}://{collapsed.group(2)}"
    if "://" not in text and "::" not in text:
        return StoreLocation(url=str(Path(text).expanduser()), protocol="file", local_path=Path(text).expanduser())
    protocol = get_protocol(text)
    if protocol in ("file", "local") and "::" not in text:
        local = Path(text.split("://", 1)[1]).expanduser()
        return StoreLocation(url=str(local), protocol="file", local_path=local)
    return StoreLocation(url=text, protocol=protocol, local_path=None)


# ----------------------------------------------------------------------------------------------------
# Validating a store (shared by the reader, `fs build` and `fs info`)


def read_root_metadata(store: "str | os.PathLike | StoreLocation") -> dict[str, Any] | None:
    """Root `zarr.json` of the store, or None when nothing is there (or an empty folder / prefix).
    Something there that is not a probe-distill store raises StoreError."""
    loc = store_location(store)
    where = loc.url
    fs, root = loc.filesystem()
    meta_key = root.rstrip("/") + "/zarr.json"
    try:
        raw = fs.cat_file(meta_key)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raw = None
    except Exception as exc:  # noqa: BLE001 - remote backends: credentials, permissions, network
        raise StoreError(f"cannot read {loc.child('zarr.json')} ({type(exc).__name__}: {exc}): check the "
                         f"--store URL and its credentials") from None
    if raw is None:
        try:
            if fs.isfile(root):
                raise StoreError(f"{where} is a file, not a feature store: pass --store a folder path")
            entries = fs.ls(root, detail=False) if fs.exists(root) else []
        except StoreError:
            raise
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        except Exception as exc:  # noqa: BLE001 - see above
            raise StoreError(f"cannot list {where} ({type(exc).__name__}: {exc}): check the --store URL "
                             f"and its credentials") from None
        if not entries:
            return None
        raise StoreError(f"{where} exists but is not a feature store (no zarr.json): "
                         f"pass a new or empty folder to --store")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"{loc.child('zarr.json')} is unreadable ({exc}): {where} is not a usable "
                         f"feature store") from None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or "schema_version" not in attrs:
        raise StoreError(f"{where} is a Zarr node but not a probe-distill feature store "
                         f"(no schema_version attribute): pass a new or empty folder to --store")
    version = attrs["schema_version"]
    if version != SCHEMA_VERSION:
        raise StoreError(f"store {where} has schema version {version}, this probe-distill "
                         f"({tool_version()}) reads version {SCHEMA_VERSION}: rebuild it into a new "
                         f"--store, or use the probe-distill release that wrote it")
    return meta


def open_zarr_group(store: "str | os.PathLike | StoreLocation", *, read_only: bool) -> zarr.Group:
    return zarr.open_group(store=store_location(store).zarr_store(read_only=read_only),
                           mode="r" if read_only else "r+")


# ----------------------------------------------------------------------------------------------------
# Reader


@dataclass
class SplitData:
    """Features of the usable (non-skipped) samples of a split, in row order."""

    features: torch.Tensor  # float32 [M, D], or [M, K, D] for view="all"
    labels: torch.Tensor  # int64 [M]
    rows: torch.Tensor  # int64 [M]: row of each sample in the store (indexes sample_ids())


class StoreSplit:
    """Read access to `<backbone>/<split>/` of a feature store."""

    def __init__(self, store: "FeatureStore", backbone: str, split: str, group: zarr.Group) -> None:
        self.store = store
        self.backbone = backbone
        self.split_name = split
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)

    def __repr__(self) -> str:
        return (f"StoreSplit({self.backbone}/{self.split_name}: n={self.n}, dim={self.dim}, "
                f"views={self.views}, complete={self.complete})")

    # --- metadata
    @property
    def n(self) -> int:
        """Rows in the store, skipped samples included (`num_valid` excludes them)."""
        return int(self.attrs["num_images"])

    @property
    def num_valid(self) -> int:
        return int(self.attrs.get("num_valid", self.n - len(self.skipped)))

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def views(self) -> int:
        return int(self.attrs["views"])

    @property
    def dtype(self) -> str:
        return str(self.attrs["dtype"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["backbone"]["fingerprint"])

    @property
    def image_size(self) -> int:
        return int(self.attrs["backbone"]["image_size"])

    @property
    def resize_size(self) -> int:
        return int(self.attrs["backbone"]["resize_size"])

    @property
    def weights_path(self) -> str | None:
        return self.attrs["backbone"].get("weights_path")

    @property
    def skipped(self) -> list[dict[str, str]]:
        """[{sample_id, reason}] of every sample that could not be decoded (label -1, never loaded)."""
        return list(self.attrs.get("skipped", []))

    def units_done(self) -> int:
        if UNIT_DONE not in self.group:  # a build killed while creating the arrays
            return 0
        return int(np.count_nonzero(self.group[UNIT_DONE][:]))

    # --- arrays
    def labels(self) -> np.ndarray:
        """int64 [N] labels of every row, -1 for skipped samples."""
        return np.asarray(self.group[LABELS][:], dtype=np.int64)

    def sample_ids(self) -> list[str]:
        return [str(s) for s in self.group[SAMPLE_IDS][:]]

    def load(self, view: int | Literal["all"] = 0, device: str | torch.device = "cpu") -> SplitData:
        """Features of the usable samples as float32. view=k -> [M, D]; view="all" -> [M, K, D]
        (K=1 for a single-view store). Read chunk by chunk to keep peak memory near the output size."""
        if view != "all":
            if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or not 0 <= view < self.views:
                raise StoreError(f"{self.backbone}/{self.split_name} holds views 0..{self.views - 1}, "
                                 f"asked for view {view!r}")
            view = int(view)
        labels = self.labels()
        keep = labels != SKIPPED_LABEL
        rows = np.flatnonzero(keep).astype(np.int64)
        array = self.group[FEATURES]
        multi = array.ndim == 3
        if view == "all":
            out = np.empty((len(rows), self.views, self.dim), dtype=np.float32)
        else:
            out = np.empty((len(rows), self.dim), dtype=np.float32)
        chunk = int(array.chunks[0])
        filled = 0
        for start in range(0, self.n, chunk):
            stop = min(self.n, start + chunk)
            mask = keep[start:stop]
            count = int(mask.sum())
            if count == 0:
                continue
            if view == "all":
                block = array[start:stop] if multi else array[start:stop][:, None, :]
            else:
                block = array[start:stop, view] if multi else array[start:stop]
            out[filled:filled + count] = block[mask]
            filled += count
        return SplitData(features=torch.from_numpy(out).to(device),
                         labels=torch.from_numpy(labels[rows]).to(device),
                         rows=torch.from_numpy(rows).to(device))

    def class_count(self) -> np.ndarray:
        return np.asarray(self.group[CLASS_COUNT][:], dtype=np.int64)

    def class_mean(self) -> np.ndarray:
        return np.asarray(self.group[CLASS_MEAN][:], dtype=np.float32)

    def class_sq_mean(self) -> np.ndarray:
        return np.asarray(self.group[CLASS_SQ_MEAN][:], dtype=np.float32)

    def class_second_moment(self) -> np.ndarray:
        """float32 [C, D, D] E[x x^T] per class; only in stores built with --full-cov."""
        if CLASS_SECOND_MOMENT not in self.group:
            raise StoreError(f"{self.backbone}/{self.split_name} has no full second moments: rebuild it "
                             f"with --full-cov (into a new store, or after deleting that group)")
        return np.asarray(self.group[CLASS_SECOND_MOMENT][:], dtype=np.float32)

    def open_backbone(self, device: str | torch.device = "cpu", weights: str | None = None):
        """The backbone that produced this split: same registry name and image size, the `weights` given,
        else the file the store was built with when it is here, else the registry's default. Its
        fingerprint must be the store's (StoreError otherwise): features computed now then match the
        stored ones."""
        from .backbones import create_backbone

        if weights is None:
            weights = self.weights_path
            if weights is not None and not Path(weights).is_file():
                weights = None  # the store was built elsewhere: the default weights, the fingerprint decides
        backbone = create_backbone(self.backbone, image_size=self.image_size, weights=weights, device=device)
        if self.fingerprint and backbone.fingerprint != self.fingerprint:
            raise StoreError(
                f"the store's {self.backbone}/{self.split_name} features were computed with weights "
                f"{self.weights_path or 'default'} (fingerprint {self.fingerprint}), but the backbone now loads "
                f"{backbone.weights_path or 'default'} (fingerprint {backbone.fingerprint}): pass the same "
                f"--weights, or rebuild the store")
        return backbone.eval()

    def dataset(self):
        """Reopen the source images of this split (same name/root/split/limit) for real pixels."""
        from .datasets import open_dataset

        ds = self.store.attrs["dataset"]
        return open_dataset(ds["name"], root=ds.get("root"), split=self.split_name,
                            limit_per_class=ds.get("limit_per_class"))

    def source(self, rows: "Sequence[int] | np.ndarray | torch.Tensor") -> tuple[Any, list[int]]:
        """(the reopened source dataset, the dataset index of each store row in `rows`), matched by sample
        id, never by position: if files were added or removed since the build, every row still finds its
        own image. A row whose image is gone raises StoreError (one line)."""
        dataset = self.dataset()
        ids = self.sample_ids()
        where = {sample_id: index for index, sample_id in enumerate(dataset.sample_ids)}
        out, missing = [], []
        for row in (rows.tolist() if hasattr(rows, "tolist") else list(rows)):
            index = where.get(ids[int(row)])
            if index is None:
                missing.append(ids[int(row)])
            out.append(index)
        if missing:
            raise StoreError(f"{len(missing)} image(s) of {self.backbone}/{self.split_name} are no longer in the "
                             f"source (e.g. {missing[0]!r}): the images changed since the store was built; "
                             f"rebuild the store")
        return dataset, out


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

    def backbones(self) -> list[str]:
        return sorted(name for name, _ in self.root.groups())

    def splits(self, backbone: str, complete_only: bool = False) -> list[str]:
        """Splits stored for `backbone` (train and val first); [] if the backbone is absent."""
        if backbone not in self.backbones():
            return []
        names = [name for name, group in self.root[backbone].groups()
                 if not complete_only or group.attrs.get("complete", False)]
        return sorted(names, key=lambda s: ({"train": 0, "val": 1}.get(s, 2), s))

    def _holdings(self) -> str:
        parts = []
        for bb in self.backbones():
            for sp in self.splits(bb):
                done = self.root[bb][sp].attrs.get("complete", False)
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
            raise StoreError(f"store {self.path} has no {backbone}/{split}; it holds: {self._holdings()}. "
                             f"Build it with `fs build {self.dataset} --backbone {backbone} --split {split} "
                             f"--store {self.path}`")
        sp = StoreSplit(self, name, split, self.root[name][split])
        if not sp.complete and not allow_incomplete:
            raise StoreError(f"{name}/{split} in {self.path} is incomplete ({sp.units_done()}/"
                             f"{sp.attrs['num_units']} units): rerun the same `fs build` command to finish it")
        return sp

    def iter_splits(self) -> Iterator[StoreSplit]:
        """Every backbone/split group, complete or not."""
        for bb in self.backbones():
            for sp in self.splits(bb):
                yield StoreSplit(self, bb, sp, self.root[bb][sp])


def open_store(store: "str | os.PathLike | StoreLocation | FeatureStore") -> FeatureStore:
    """A FeatureStore from a path, URL or location; an already open one is returned as is."""
    return store if isinstance(store, FeatureStore) else FeatureStore.open(store)
