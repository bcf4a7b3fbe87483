"""Reading a split of a feature store: `StoreSplit` (`<backbone>/<split>/`: attributes, checked reads of
features, labels and sample ids, class statistics, the backbone and the source images that produced
it) and `SplitData`. Every read runs the checks of `featurestore.checks` on what it read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from .checks import (Bad, Damage, check_features_finite, check_labels, check_sample_ids, check_skipped_rows,
                     check_statistic_values, describe_read_error, unit_skipped_rows)
from .errors import StoreError
from .location import open_child
from .schema import (CLASS_COUNT, CLASS_MEAN, CLASS_SECOND_MOMENT, CLASS_SQ_MEAN, FEATURES, LABELS, SAMPLE_IDS,
                     SKIPPED_LABEL, UNIT_DONE, UNIT_SKIPPED, array_specs, rebuild_command, unit_rows)

if TYPE_CHECKING:
    from .store import FeatureStore


@dataclass
class SplitData:
    """Features of the usable (non-skipped) samples of a split, in row order."""

    features: torch.Tensor  # float32 [M, D], or [M, K, D] for view="all"
    labels: torch.Tensor  # int64 [M]
    rows: torch.Tensor  # int64 [M]: row of each sample in the store (indexes sample_ids())



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


class StoreSplit:
    """Read access to `<backbone>/<split>/` of a feature store.

    Reads check what they read, per chunk (= work unit) and vectorized: a chunk that fails to decode (its
    CRC32C checksum, in stores that have one), a features row that is not finite although the row holds
    an image (a missing chunk reads as NaN), a label out of range, or rows marked skipped that the unit's
    skipped list does not account for (a missing labels chunk reads as -1) raise one StoreError line
    naming the array, the rows and the `fs build --repair` command. `verify()` checks everything."""

    def __init__(self, store: FeatureStore, backbone: str, split: str, group: zarr.Group) -> None:
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
        try:
            check_labels(labels, top)
        except Bad as bad:
            raise self._damaged(bad.array, bad.row // chunk, bad.what) from None
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
            try:
                check_skipped_rows(labels[lo:hi], lo, unit_skipped_rows(str(self._read(UNIT_SKIPPED, unit, unit, array))))
            except Bad as bad:
                raise self._damaged(bad.array, unit, bad.what) from None
        raise StoreError(f"store {self.store.location}: {self.backbone}/{self.split_name} attribute num_skipped "
                         f"({self.attrs['num_skipped']}) disagrees with its labels: {self.rebuild_hint()}")

    def sample_ids(self) -> list[str]:
        """Every row's sample id (skipped rows included); an empty id is a chunk lost on disk (its fill
        value), refused here rather than reported later as an image gone from the source."""
        ids = [str(s) for s in self._read(SAMPLE_IDS)]
        try:
            check_sample_ids(ids)
        except Bad as bad:
            raise self._damaged(bad.array, bad.row // int(self.attrs["chunk_rows"]), bad.what) from None
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
            try:
                check_features_finite(part)
            except Bad as bad:
                raise self._damaged(bad.array, unit, bad.what) from None
            filled += count
        return SplitData(features=torch.from_numpy(out).to(device),
                         labels=torch.from_numpy(labels[rows]).to(device),
                         rows=torch.from_numpy(rows).to(device))

    def _class_statistic(self, name: str, dtype: Any) -> np.ndarray:
        values = self._read(name).astype(dtype, copy=False)
        try:
            check_statistic_values(name, values)
        except Bad as bad:
            raise self._damaged(bad.array, None, bad.what) from None
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

    def verify(self) -> list[Damage]:
        """Every check a read makes, on every row, view and array, and the unit and class statistics
        against the stored features (`featurestore.verify`). Reads everything; writes nothing."""
        from .verify import verify_split

        return verify_split(self)

    def open_dataset(self):
        """Reopen the source images of this split (same name/root/split/limit) for real pixels."""
        from .datasets import open_dataset

        ds = self.attrs.get("dataset") or self.store.attrs["dataset"]  # the split's own limit per class
        return open_dataset(ds["name"], root=ds.get("root"), split=self.split_name,
                            limit_per_class=ds.get("limit_per_class"))

    def canonical_images(self, rows: "Sequence[int] | np.ndarray | torch.Tensor", resolution: int) -> torch.Tensor:
        """The source images of store rows `rows` as canonical images (`datasets.canonical_image`: float32
        [len(rows), 3, R, R] in [0, 1], R = `resolution`), found by sample id (`source`)."""
        from .datasets import canonical_image

        dataset, indices = self.source(rows)
        return torch.stack([canonical_image(dataset.load_image(i), resolution) for i in indices])

    def source(self, rows: "Sequence[int] | np.ndarray | torch.Tensor") -> tuple[Any, list[int]]:
        """(the reopened source dataset, the dataset index of each store row in `rows`), matched by sample
        id, never by position: if files were added or removed since the build, every row still finds its
        own image. A row whose image is gone raises StoreError (one line)."""
        dataset = self.open_dataset()
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
