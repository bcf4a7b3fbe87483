"""Reading a feature store (a Zarr v3 group of frozen-backbone features of a labelled image dataset), and
where a store lives.

The layout, attributes and array specifications are in `featurestore.schema`.

A store is a local folder (zarr LocalStore) or any fsspec URL such as s3://bucket/fs (zarr FsspecStore;
the backend package, e.g. s3fs, is an optional dependency): see `StoreLocation`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import zarr
import zarr.abc.store
import zarr.storage
from zarr.codecs import Crc32cCodec

from .errors import StoreError, one_line
from .runtime import tool_version
from .schema import (CLASS_COUNT, CLASS_MEAN, CLASS_SECOND_MOMENT, CLASS_SQ_MEAN, FEATURES, LABELS, SAMPLE_IDS,
                     SCHEMA_VERSION, SKIPPED_LABEL, UNIT_COLOUR, UNIT_COLOUR_MISSING, UNIT_COUNT, UNIT_DONE,
                     UNIT_OUTER, UNIT_SKIPPED, UNIT_SQSUM, UNIT_SUM, array_specs, rebuild_command, unit_rows)

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
        # Hidden entries (a build's lock folder `.locks`, `.DS_Store`) do not make a folder a non-store:
        # a first build killed before it wrote zarr.json leaves its lock behind.
        entries = [e for e in entries if not _basename(e).startswith(".")]
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
    if version != SCHEMA_VERSION or not isinstance(version, int) or isinstance(version, bool):
        shown = f"{version!r} (a {type(version).__name__ if not isinstance(version, str) else 'string'})" \
            if not isinstance(version, int) or isinstance(version, bool) else str(version)
        raise StoreError(f"store {where} has schema version {shown}, this probe-distill "
                         f"({tool_version()}) reads version {SCHEMA_VERSION}: rebuild it into a new "
                         f"--store, or use the probe-distill release that wrote it")
    return meta


def open_zarr_group(store: "str | os.PathLike | StoreLocation", *, read_only: bool) -> zarr.Group:
    return zarr.open_group(store=store_location(store).zarr_store(read_only=read_only),
                           mode="r" if read_only else "r+")


def _basename(entry: Any) -> str:
    return PurePosixPath(str(entry).rstrip("/")).name


def child_names(location: StoreLocation, *parts: str) -> list[str]:
    """Names of the entries under `parts` of the store that may be Zarr children (sorted): hidden entries
    (the `.locks` folder of builds) and zarr.json left out. Listed with fsspec rather than zarr's
    `Group.groups()`, which parses every child at once: one damaged child would hide all the others, and
    zarr warns about every folder it does not recognise."""
    fs, root = location.filesystem()
    path = "/".join([root.rstrip("/"), *parts])
    try:
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except Exception as exc:  # noqa: BLE001 - remote backends: credentials, permissions, network
        raise StoreError(f"cannot list {location.child(*parts)} ({type(exc).__name__}: {exc}): check the "
                         f"--store URL and its credentials") from None
    names = {_basename(e) for e in entries}
    return sorted(n for n in names if n and not n.startswith(".") and n != "zarr.json")


def describe_read_error(exc: BaseException) -> str:
    """What went wrong reading a chunk, in a few words (zarr's messages quote raw bytes)."""
    text = str(exc)
    if "checksum" in text.lower():
        return "checksum mismatch: the chunk was changed or truncated on disk"
    return one_line(exc)


def open_child(location: StoreLocation, group: zarr.Group, name: str, what: str) -> Any:
    """`group[name]`, or None when `name` is no Zarr node (a stray folder); StoreError (one line) when its
    metadata cannot be read (a truncated zarr.json)."""
    try:
        return group[name]
    except KeyError:
        return None
    except Exception as exc:  # noqa: BLE001 - JSON and metadata validation errors of a damaged zarr.json
        path = location.child(*[p for p in (group.path, name) if p])
        raise StoreError(f"the metadata of {what} {path} is unreadable ({one_line(exc)}): the store is "
                         f"damaged there; delete {path} and rebuild it with `fs build`") from None


# ----------------------------------------------------------------------------------------------------
# Reader


@dataclass
class SplitData:
    """Features of the usable (non-skipped) samples of a split, in row order."""

    features: torch.Tensor  # float32 [M, D], or [M, K, D] for view="all"
    labels: torch.Tensor  # int64 [M]
    rows: torch.Tensor  # int64 [M]: row of each sample in the store (indexes sample_ids())


@dataclass(frozen=True)
class Damage:
    """A damaged part of a split, found by `StoreSplit.verify`."""

    backbone: str
    split: str
    what: str  # "<array>: what is wrong"
    unit: int | None = None  # the work unit `fs build --repair` recomputes; None: the split as a whole
    rows: tuple[int, int] | None = None  # [start, stop) of the unit
    repairable: bool = True  # False: metadata damage that only deleting the split and rebuilding fixes

    def line(self) -> str:
        where = f"{self.backbone}/{self.split}"
        if self.unit is not None and self.rows is not None:
            where += f" unit {self.unit} (rows {self.rows[0]}-{self.rows[1] - 1})"
        return f"{where}: {self.what}"


class _Bad(Exception):
    """Internal: one check of `StoreSplit.verify` failed (array, what)."""

    def __init__(self, array: str, what: str) -> None:
        super().__init__(f"{array}: {what}")
        self.array = array
        self.what = what


def _chunk_tails(array: zarr.Array) -> list[bytes]:
    """The last 4 bytes (the CRC32C) of every chunk of `array`, in chunk order; b"" for an absent chunk."""
    import asyncio

    from zarr.abc.store import SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    prototype = default_buffer_prototype()

    async def tail(coords: tuple[int, ...]) -> bytes:
        buffer = await (array.store_path / array.metadata.encode_chunk_key(coords)).get(
            prototype=prototype, byte_range=SuffixByteRequest(4))
        return b"" if buffer is None else buffer.to_bytes()

    async def tails() -> list[bytes]:
        return list(await asyncio.gather(*(tail(c) for c in np.ndindex(*array.cdata_shape))))

    return sync(tails())


def _check_unit_partials(partials: dict[str, np.ndarray], view0: np.ndarray, labels: np.ndarray,
                         present: np.ndarray, dtype: np.dtype) -> None:
    """A unit's stored partial sums must be those of its stored view-0 features. The build summed the
    float32 backbone output before the cast to the storage dtype, so the two differ by that cast's
    rounding: at most eps/2 of each |x| per row (eps of the storage dtype; for fp32 storage only the
    float64 summation order), plus a subnormal's step per row. Twice that is the bound; a lost chunk
    (read as 0) or features rewritten with valid checksums are far outside it."""
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.finfo(np.float32)
    eps, floor = float(info.eps), float(info.smallest_subnormal)
    x = view0.astype(np.float64)
    for j, c in enumerate(present):
        rows = x[labels == c]
        absx = np.abs(rows)
        recomputed = {UNIT_SUM: (rows.sum(axis=0), absx.sum(axis=0)),
                      UNIT_SQSUM: ((rows * rows).sum(axis=0), 2 * (absx * absx).sum(axis=0)),
                      UNIT_OUTER: (rows.T @ rows, 2 * absx.T @ absx)}
        for name, stored in partials.items():
            want, scale = recomputed[name]
            diff = np.abs(stored[j] - want)
            bound = 2 * (eps * scale + len(rows) * floor)
            if (diff > bound).any():
                if not stored[j].any():
                    raise _Bad(name, f"class {int(c)} missing: a lost chunk reads as 0, the unit's features "
                                     f"of that class do not sum to 0")
                raise _Bad(FEATURES, f"disagree with the unit's partial sums ({name}, class {int(c)}, "
                                     f"max abs diff {float(diff.max()):.3g}): features or {name} changed "
                                     f"since the build")


_CLASS_STATISTIC_PARTIAL = {CLASS_MEAN: UNIT_SUM, CLASS_SQ_MEAN: UNIT_SQSUM, CLASS_SECOND_MOMENT: UNIT_OUTER}


def _check_class_statistic(name: str, values: np.ndarray, merged: dict[str, np.ndarray],
                           counts: np.ndarray) -> None:
    """A class statistic must be the merged unit sums over the class count, cast to float32 (what the
    build's finalize writes): within the float32 cast's rounding, eps32 of the class's largest value."""
    partial = _CLASS_STATISTIC_PARTIAL[name]
    if partial not in merged:
        return
    denom = np.maximum(counts, 1).astype(np.float64).reshape((-1,) + (1,) * (values.ndim - 1))
    want = merged[partial] / denom
    diff = np.abs(values.astype(np.float64) - want)
    axes = tuple(range(1, values.ndim))
    bound = float(np.finfo(np.float32).eps) * np.abs(want).max(axis=axes, keepdims=True) + 1e-30
    bad = (diff > bound).any(axis=axes)
    if bad.any():
        c = int(np.flatnonzero(bad)[0])
        raise _Bad(name, f"disagrees with the units' partial sums (class {c}, max abs diff "
                         f"{float(diff[c].max()):.3g})")


class StoreSplit:
    """Read access to `<backbone>/<split>/` of a feature store.

    Reads check what they read, per chunk (= work unit) and vectorized: a chunk that fails to decode (its
    CRC32C checksum, in stores that have one), a features row that is not finite although the row holds
    an image (a missing chunk reads as NaN), a label out of range, or rows marked skipped that the unit's
    skipped list does not account for (a missing labels chunk reads as -1) raise one StoreError line
    naming the array, the rows and the `fs build --repair` command. `verify()` checks everything."""

    def __init__(self, store: "FeatureStore", backbone: str, split: str, group: zarr.Group) -> None:
        self.store = store
        self.backbone = backbone
        self.split_name = split
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._content_digest: str | None = None

    def __repr__(self) -> str:
        return (f"StoreSplit({self.backbone}/{self.split_name}: n={self.n}, dim={self.dim}, "
                f"views={self.views}, complete={self.complete})")

    # --- metadata
    @property
    def n(self) -> int:
        """Rows in the store, skipped samples included (`num_valid` excludes them)."""
        return int(self.attrs["num_images"])

    @property
    def greyscale(self) -> bool | None:
        """True when every image of the split is grey (R = G = B); None for stores that did not record it."""
        value = self.attrs.get("greyscale")
        return None if value is None else bool(value)

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
        """Units whose completion marker is set (an unreadable marker counts as not done)."""
        if UNIT_DONE not in self.group:  # a build killed while creating the arrays
            return 0
        array = self.group[UNIT_DONE]
        try:
            return int(np.count_nonzero(array[:]))
        except Exception:  # noqa: BLE001 - a damaged marker chunk: count the readable ones (fs verify names it)
            done = 0
            for unit in range(array.shape[0]):
                try:
                    done += int(bool(array[unit]))
                except Exception:  # noqa: BLE001
                    pass
            return done

    # --- damage reporting
    def rebuild_hint(self) -> str:
        return "rebuild with: " + rebuild_command(self.store.location.url, dict(self.store.attrs.get("dataset", {})),
                                                  self.backbone, self.attrs, self.split_name)

    def _damaged(self, array: str, unit: int | None, what: str) -> StoreError:
        rows = ""
        if unit is not None:
            lo, hi = unit_rows(unit, int(self.attrs["chunk_rows"]), self.n)
            rows = f" rows {lo}-{hi - 1} (unit {unit} of {self.attrs['num_units']})"
        return StoreError(f"store {self.store.location}: {self.backbone}/{self.split_name} {array}{rows} is "
                          f"damaged ({what}): {self.rebuild_hint()}")

    def _array(self, name: str) -> zarr.Array:
        node = open_child(self.store.location, self.group, name, "array")
        if not isinstance(node, zarr.Array):
            raise StoreError(f"store {self.store.location}: {self.backbone}/{self.split_name} has no {name} array: "
                             f"the store is damaged; delete {self.store.location.child(self.backbone, self.split_name)} "
                             f"and rebuild the split")
        expected = self._expected_shape(name)
        if expected is not None and tuple(node.shape) != expected:
            raise StoreError(f"store {self.store.location}: {self.backbone}/{self.split_name} {name} has shape "
                             f"{tuple(node.shape)}, the split's attributes say {expected}: its metadata is damaged; "
                             f"delete {self.store.location.child(self.backbone, self.split_name)} and rebuild the split")
        return node

    def _expected_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape the split's attributes give array `name` (None for an unknown name). Every array is
        checked, not only the per-row ones: a statistics array declaring another D or class count would
        otherwise fail to decode and be called a damaged chunk, advising a `--repair` that then refuses
        (verify calls a wrong shape metadata damage, which only rebuilding the split fixes)."""
        try:
            spec = array_specs(self.attrs, self.store.num_classes).get(name)
        except (KeyError, TypeError, ValueError, StoreError):
            return None  # verify names incomplete attributes
        return None if spec is None else tuple(int(x) for x in spec["shape"])

    def _read(self, name: str, selection: Any = slice(None), unit: int | None = None,
              array: zarr.Array | None = None) -> np.ndarray:
        """`array[selection]`; a chunk that does not decode (checksum, truncation) -> StoreError."""
        array = self._array(name) if array is None else array
        try:
            return np.asarray(array[selection])
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - codec errors come in several types
            raise self._damaged(name, unit, describe_read_error(exc)) from None

    def _unit_skipped_rows(self, unit: int, array: zarr.Array | None = None) -> set[int]:
        entry = str(self._read(UNIT_SKIPPED, unit, unit, array))
        try:
            return {int(row) for row, _ in json.loads(entry)} if entry else set()
        except (ValueError, TypeError) as exc:
            raise self._damaged(UNIT_SKIPPED, unit, f"not a JSON list of [row, reason]: {one_line(exc)}") from None

    # --- arrays
    def labels(self) -> np.ndarray:
        """int64 [N] labels of every row, -1 for skipped samples. Checked per unit: decodable, in range,
        and (in a complete split) -1 exactly where the units' skipped lists say."""
        array = self._array(LABELS)
        chunk = int(array.chunks[0])
        top = self.store.num_classes
        try:  # one concurrent read on the fast path; chunk by chunk only to say which chunk is damaged
            labels = np.asarray(array[:], dtype=np.int64)
        except Exception:  # noqa: BLE001 - codec errors come in several types
            for unit, start in enumerate(range(0, self.n, chunk)):
                self._read(LABELS, slice(start, min(self.n, start + chunk)), unit, array)
            raise  # pragma: no cover - a failure that no single chunk reproduces
        bad = np.flatnonzero((labels < SKIPPED_LABEL) | (labels >= top))
        if len(bad):
            raise self._damaged(LABELS, int(bad[0]) // chunk, f"label {int(labels[bad[0]])} out of range -1..{top - 1}")
        if self.complete and "num_skipped" in self.attrs:
            self._check_skipped(labels)
        return labels

    def _check_skipped(self, labels: np.ndarray) -> None:
        """-1 labels must be the rows the units' skipped lists name. Counted first (cheap); the per-unit
        lists are read only when the counts differ, to say which unit is damaged."""
        if int(np.count_nonzero(labels == SKIPPED_LABEL)) == int(self.attrs["num_skipped"]):
            return
        array = self._array(UNIT_SKIPPED)
        chunk_rows = int(self.attrs["chunk_rows"])
        for unit in range(int(self.attrs["num_units"])):
            lo, hi = unit_rows(unit, chunk_rows, self.n)
            marked = set((np.flatnonzero(labels[lo:hi] == SKIPPED_LABEL) + lo).tolist())
            listed = self._unit_skipped_rows(unit, array)
            if marked != listed:
                raise self._damaged(LABELS, unit, f"{len(marked - listed)} row(s) labelled -1 (skipped) that the "
                                                  f"unit's skipped list does not name: a missing or overwritten chunk")
        raise StoreError(f"store {self.store.location}: {self.backbone}/{self.split_name} attribute num_skipped "
                         f"({self.attrs['num_skipped']}) disagrees with its labels: {self.rebuild_hint()}")

    def sample_ids(self) -> list[str]:
        """Every row's sample id (skipped rows included); an empty id is a chunk lost on disk (its fill
        value), refused here rather than reported later as an image gone from the source."""
        ids = [str(s) for s in self._read(SAMPLE_IDS)]
        if "" in ids:
            unit = ids.index("") // int(self.attrs["chunk_rows"])
            raise self._damaged(SAMPLE_IDS, unit, "empty sample ids: a missing chunk")
        return ids

    def load(self, view: int | Literal["all"] = 0, device: str | torch.device = "cpu",
             rows: np.ndarray | None = None) -> SplitData:
        """Features of the usable samples as float32. view=k -> [M, D]; view="all" -> [M, K, D]
        (K=1 for a single-view store). `rows`: only these store rows (of the usable ones), e.g. a sample
        of a split too large for memory. Read chunk by chunk to keep peak memory near the output size, and
        checked per chunk (see the class docstring): damage raises StoreError, never a wrong result."""
        if view != "all":
            if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or not 0 <= view < self.views:
                raise StoreError(f"{self.backbone}/{self.split_name} holds views 0..{self.views - 1}, "
                                 f"asked for view {view!r}")
            view = int(view)
        labels = self.labels()
        keep = labels != SKIPPED_LABEL
        if rows is not None:
            wanted = np.zeros_like(keep)
            wanted[np.asarray(rows, dtype=np.int64)] = True
            keep &= wanted
        rows = np.flatnonzero(keep).astype(np.int64)
        array = self._array(FEATURES)
        multi = array.ndim == 3
        if view == "all":
            out = np.empty((len(rows), self.views, self.dim), dtype=np.float32)
        else:
            out = np.empty((len(rows), self.dim), dtype=np.float32)
        chunk = int(array.chunks[0])
        filled = 0
        for unit, start in enumerate(range(0, self.n, chunk)):
            stop = min(self.n, start + chunk)
            mask = keep[start:stop]
            count = int(mask.sum())
            if count == 0:
                continue
            if view == "all":
                block = self._read(FEATURES, slice(start, stop), unit, array)
                block = block if multi else block[:, None, :]
            else:
                block = self._read(FEATURES, (slice(start, stop), view) if multi else slice(start, stop), unit, array)
            part = out[filled:filled + count]
            part[...] = block[mask]
            if not np.isfinite(part).all():
                raise self._damaged(FEATURES, unit, "non-finite values in rows that hold an image: a missing "
                                                    "or overwritten chunk")
            filled += count
        return SplitData(features=torch.from_numpy(out).to(device),
                         labels=torch.from_numpy(labels[rows]).to(device),
                         rows=torch.from_numpy(rows).to(device))

    def _class_statistic(self, name: str, dtype: Any) -> np.ndarray:
        values = self._read(name).astype(dtype, copy=False)
        bad = (values < 0).any() if name == CLASS_COUNT else not np.isfinite(values).all()
        if bad:  # fills: -1 counts, NaN moments, i.e. a chunk missing
            raise StoreError(f"store {self.store.location}: {self.backbone}/{self.split_name} {name} is damaged "
                             f"(missing or invalid values): {self.rebuild_hint()}")
        return values

    def class_count(self) -> np.ndarray:
        return self._class_statistic(CLASS_COUNT, np.int64)

    def class_mean(self) -> np.ndarray:
        return self._class_statistic(CLASS_MEAN, np.float32)

    def class_sq_mean(self) -> np.ndarray:
        return self._class_statistic(CLASS_SQ_MEAN, np.float32)

    def class_second_moment(self) -> np.ndarray:
        """float32 [C, D, D] E[x x^T] per class; only in stores built with --full-cov."""
        if CLASS_SECOND_MOMENT not in self.group:
            raise StoreError(f"{self.backbone}/{self.split_name} has no full second moments: rebuild it "
                             f"with --full-cov (into a new store, or after deleting that group)")
        return self._class_statistic(CLASS_SECOND_MOMENT, np.float32)

    def content_digest(self) -> str:
        """A digest of the stored features and labels: in checksummed stores, of every chunk's CRC32C (the
        last 4 bytes of each chunk, which every read checks against the chunk's bytes, so what a read
        returns is what was digested) - 4 bytes read per chunk; in older stores, of the arrays' bytes.
        A split rebuilt from other pixels under the same sample ids has another digest. Computed once per
        StoreSplit (a run records the content it started on)."""
        if self._content_digest is not None:
            return self._content_digest
        digest = hashlib.sha256()
        for name in (FEATURES, LABELS):
            array = self._array(name)
            digest.update(f"{name} {array.shape} {array.dtype}".encode())
            if isinstance(array.metadata.codecs[-1], Crc32cCodec):  # the CRC is each chunk's tail
                digest.update(b"".join(_chunk_tails(array)))
            else:  # no checksums: the bytes themselves, chunk by chunk
                chunk = int(array.chunks[0])
                for start in range(0, array.shape[0], chunk):
                    digest.update(np.ascontiguousarray(self._read(name, slice(start, start + chunk),
                                                                  start // chunk, array)).tobytes())
        self._content_digest = digest.hexdigest()[:32]
        return self._content_digest

    # --- full check
    def verify(self) -> list[Damage]:
        """Every check a read makes, on every row, view and array: each unit's completion marker, every
        chunk decodes (checksum), features finite where a row holds an image, labels in range and -1
        exactly on the rows the unit's skipped list names, sample ids present, the unit's partial
        statistics decodable, finite, consistent with its labels and equal to the sums recomputed from its
        stored features (a lost unit_sum chunk reads as 0, features rewritten with valid checksums
        change the sums), its unit_colour present; then the class statistics present, finite and equal
        to the merged unit counts and sums. Reads everything; writes nothing. A damaged unit is
        reported once (its first failed check)."""
        def whole(what: str, repairable: bool = False) -> Damage:
            return Damage(self.backbone, self.split_name, what, repairable=repairable)

        problem = self.store.class_names_problem(self.attrs.get("num_classes"))
        if problem is not None:
            return [whole(f"{problem}: rebuild the store")]
        try:
            n, r, u = self.n, int(self.attrs["chunk_rows"]), int(self.attrs["num_units"])
            specs = array_specs(self.attrs, self.store.num_classes)
            if UNIT_COLOUR not in self.group:  # stores built before colour was recorded
                specs.pop(UNIT_COLOUR)
            if not self.complete and self.units_done() == 0 and any(name not in self.group for name in specs):
                # A build stopped (killed, disk full) while it created the split's arrays: no unit is done
                # and the next `fs build` creates what is missing. Incomplete, not damaged.
                return []
            arrays = {name: self._array(name) for name in specs}
        except StoreError as exc:
            return [whole(str(exc).split(": ", 1)[-1])]
        except (KeyError, TypeError, ValueError) as exc:
            return [whole(f"split attributes incomplete ({one_line(exc)}): delete "
                          f"{self.store.location.child(self.backbone, self.split_name)} and rebuild the split")]
        for name, spec in specs.items():
            if tuple(arrays[name].shape) != tuple(spec["shape"]):
                return [whole(f"{name}: shape {arrays[name].shape}, expected {spec['shape']}: delete "
                              f"{self.store.location.child(self.backbone, self.split_name)} and rebuild the split")]
        c = self.store.num_classes
        complete = self.complete
        damages: list[Damage] = []
        total_counts = np.zeros(c, dtype=np.int64)
        total_skipped = 0
        merged = {name: np.zeros((c, *arrays[name].shape[2:])) for name in (UNIT_SUM, UNIT_SQSUM, UNIT_OUTER)
                  if name in arrays}
        # Stores from before unit_colour had a 'missing' fill value read a lost chunk as a plausible 0.
        colour_checked = UNIT_COLOUR in arrays and arrays[UNIT_COLOUR].fill_value == UNIT_COLOUR_MISSING

        def read(name: str, selection: Any) -> np.ndarray:
            try:
                return np.asarray(arrays[name][selection])
            except Exception as exc:  # noqa: BLE001 - codec errors come in several types
                raise _Bad(name, describe_read_error(exc)) from None

        for k in range(u):
            lo, hi = unit_rows(k, r, n)
            try:
                if not int(read(UNIT_DONE, k)):
                    if complete:
                        raise _Bad(UNIT_DONE, "completion marker missing in a complete split")
                    continue  # not built yet: the normal resume path finishes it
                labels = read(LABELS, slice(lo, hi)).astype(np.int64, copy=False)
                bad = (labels < SKIPPED_LABEL) | (labels >= c)
                if bad.any():
                    raise _Bad(LABELS, f"label {int(labels[bad][0])} out of range -1..{c - 1}")
                valid = labels != SKIPPED_LABEL
                features = read(FEATURES, slice(lo, hi))
                if not np.isfinite(features[valid]).all():
                    raise _Bad(FEATURES, "non-finite values in rows that hold an image: a missing or "
                                         "overwritten chunk")
                ids = read(SAMPLE_IDS, slice(lo, hi))
                if any(str(i) == "" for i in ids):
                    raise _Bad(SAMPLE_IDS, "empty sample ids: a missing chunk")
                entry = str(read(UNIT_SKIPPED, k))
                try:
                    listed = {int(row) for row, _ in json.loads(entry)} if entry else set()
                except (ValueError, TypeError):
                    raise _Bad(UNIT_SKIPPED, "not a JSON list of [row, reason]") from None
                marked = set((np.flatnonzero(~valid) + lo).tolist())
                if marked != listed:
                    raise _Bad(LABELS, f"{len(marked ^ listed)} row(s) where the -1 (skipped) labels and the "
                                       f"unit's skipped list disagree: a missing or overwritten chunk")
                counts = read(UNIT_COUNT, k).astype(np.int64, copy=False)
                if not np.array_equal(counts, np.bincount(labels[valid], minlength=c)):
                    raise _Bad(UNIT_COUNT, "per-class counts disagree with the labels")
                present = np.flatnonzero(counts)
                if len(present):
                    view0 = features[valid] if features.ndim == 2 else features[valid][:, 0]
                    partials = {name: self._unit_partials(arrays[name], k, present) for name in merged}
                    _check_unit_partials(partials, view0, labels[valid], present, features.dtype)
                    for name, values in partials.items():
                        merged[name][present] += values
                if colour_checked:
                    colour = int(read(UNIT_COLOUR, k))
                    if colour == UNIT_COLOUR_MISSING:
                        raise _Bad(UNIT_COLOUR, "missing (a missing chunk)")
                    if colour not in (0, 1):
                        raise _Bad(UNIT_COLOUR, f"value {colour}, expected 0 or 1")
                total_counts += counts
                total_skipped += len(listed)
            except _Bad as bad:
                damages.append(Damage(self.backbone, self.split_name, str(bad), unit=k, rows=(lo, hi)))
        if not complete:
            return damages
        try:
            stats = (CLASS_COUNT, CLASS_MEAN, CLASS_SQ_MEAN, CLASS_SECOND_MOMENT)
            for name in (name for name in stats if name in arrays):
                values = read(name, slice(None))
                if (values < 0).any() if name == CLASS_COUNT else not np.isfinite(values).all():
                    raise _Bad(name, "missing or invalid values (a missing chunk?)")
                if name == CLASS_COUNT and not damages and not np.array_equal(values, total_counts):
                    raise _Bad(name, "disagrees with the units' counts")
                if name != CLASS_COUNT and not damages:
                    _check_class_statistic(name, values, merged, total_counts)
            if not damages and int(self.attrs.get("num_skipped", total_skipped)) != total_skipped:
                raise _Bad("attribute num_skipped", f"says {self.attrs.get('num_skipped')}, the units list "
                                                    f"{total_skipped}")
        except _Bad as bad:
            damages.append(whole(f"class statistics: {bad}", repairable=True))
        return damages

    def _unit_partials(self, array: zarr.Array, unit: int, present: np.ndarray) -> np.ndarray:
        """The stored partial sums of one unit for the classes it saw (float64)."""
        selection = (unit, present) + (slice(None),) * (array.ndim - 2)
        try:
            values = np.asarray(array.get_orthogonal_selection(selection), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - codec errors come in several types
            raise _Bad(array.basename, describe_read_error(exc)) from None
        if not np.isfinite(values).all():
            raise _Bad(array.basename, "non-finite partial sums")
        return values

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

        ds = self.attrs.get("dataset") or self.store.attrs["dataset"]  # the split's own limit per class
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
