"""Writing one work unit: `UnitWriter` buffers a unit's rows in float32 and writes every chunk of it, its
partial class statistics (`featurestore.statistics`), its skipped list, then (last) its completion
marker; `store_writes`: an OSError while writing the store (disk full, permissions) as one StoreError."""

from __future__ import annotations

import contextlib
import errno
import json
from typing import Any, Iterator

import numpy as np
import zarr

from . import schema
from .datasets import ImageDataset
from .errors import StoreError
from .runtime import describe_os_error
from .statistics import class_sums, unit_counts


def write_error(where: str, exc: OSError) -> StoreError:
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
def store_writes(where: str) -> Iterator[None]:
    """Turn OSErrors of store writes (disk full, permissions, read-only file system) into StoreError."""
    try:
        yield
    except OSError as exc:
        raise write_error(where, exc) from None


class UnitWriter:
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
        with store_writes(self.where):
            self._write(a, k, lo, hi, stored, valid)
        self.unit = None

    def _write(self, a: dict[str, zarr.Array], k: int, lo: int, hi: int, stored: np.ndarray,
               valid: np.ndarray) -> None:
        a[schema.FEATURES][lo:hi] = stored
        a[schema.LABELS][lo:hi] = self.labels
        a[schema.SAMPLE_IDS][lo:hi] = np.array(self.ds.sample_ids[lo:hi], dtype=object).astype(str)
        view0 = (self.features if self.views == 1 else self.features[:, 0]).astype(np.float64)[valid]
        labels = self.labels[valid]
        counts = unit_counts(labels, self.num_classes)
        present = np.flatnonzero(counts)
        sums = class_sums(view0, labels, present, self.full_cov)
        a[schema.UNIT_COUNT][k] = counts
        if len(present):
            for name, values in sums.items():
                a[name].set_orthogonal_selection((k, present) + (slice(None),) * (values.ndim - 1), values)
        a[schema.UNIT_SKIPPED][k] = json.dumps(sorted(self.skipped)) if self.skipped else ""
        if schema.UNIT_COLOUR in a:
            a[schema.UNIT_COLOUR][k] = int(self.colour)
        a[schema.UNIT_DONE][k] = 1  # the completion marker: written last
