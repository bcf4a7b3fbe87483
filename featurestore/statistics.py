"""Class statistics of a split, from per-unit partial sums: what a unit stores (`unit_counts`,
`class_sums`, float64, of its view-0 features), how the units merge into the class statistics
(`finalize_split`: exact, in unit order, idempotent), and how `verify` checks both against the stored
features. The build and `verify` compute them with these same functions."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import zarr

from .checks import Bad
from .schema import (CLASS_COUNT, CLASS_MEAN, CLASS_SECOND_MOMENT, CLASS_SQ_MEAN, FEATURES, SAMPLE_IDS, UNIT_COLOUR,
                     UNIT_COUNT, UNIT_DONE, UNIT_OUTER, UNIT_SKIPPED, UNIT_SQSUM, UNIT_SUM)

# The class statistic each partial sum merges into.
CLASS_STATISTIC_OF = {UNIT_SUM: CLASS_MEAN, UNIT_SQSUM: CLASS_SQ_MEAN, UNIT_OUTER: CLASS_SECOND_MOMENT}
_PARTIAL_OF = {statistic: partial for partial, statistic in CLASS_STATISTIC_OF.items()}


def unit_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C]: images per class among `labels` (those of a unit's rows that hold an image)."""
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def class_sums(view0: np.ndarray, labels: np.ndarray, present: np.ndarray, full_cov: bool) -> dict[str, np.ndarray]:
    """A unit's partial sums, float64, one row per class in `present`: of x (unit_sum), of x * x
    (unit_sqsum) and, with `full_cov`, of x x^T (unit_outer); `view0`: float64 [m, D], `labels`: [m]."""
    dim = view0.shape[1]
    sums = {UNIT_SUM: np.zeros((len(present), dim)), UNIT_SQSUM: np.zeros((len(present), dim))}
    if full_cov:
        sums[UNIT_OUTER] = np.zeros((len(present), dim, dim))
    for j, c in enumerate(present):
        x = view0[labels == c]
        sums[UNIT_SUM][j] = x.sum(axis=0)
        sums[UNIT_SQSUM][j] = (x * x).sum(axis=0)
        if full_cov:
            sums[UNIT_OUTER][j] = x.T @ x
    return sums


def per_class(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Merged sums [C, ...] over the class counts (an empty class: 0), float64."""
    return sums / np.maximum(counts, 1).astype(np.float64).reshape((-1,) + (1,) * (sums.ndim - 1))


def finalize_split(group: zarr.Group, class_names: Sequence[str]) -> bool:
    """If every unit is done: merge per-unit partial sums into the class statistics and mark the split
    complete. Exact (float64 sums, fixed unit order) and idempotent. Returns whether it is complete."""
    attrs = dict(group.attrs)
    done = np.asarray(group[UNIT_DONE][:])
    if not done.all():
        return False
    unit_count = np.asarray(group[UNIT_COUNT][:], dtype=np.int64)
    counts = unit_count.sum(axis=0)
    names = (UNIT_SUM, UNIT_SQSUM, UNIT_OUTER) if attrs["full_cov"] else (UNIT_SUM, UNIT_SQSUM)
    c, d = len(class_names), attrs["dim"]
    merged = {name: np.zeros((c, d, d) if name == UNIT_OUTER else (c, d)) for name in names}
    for k in range(len(unit_count)):
        present = np.flatnonzero(unit_count[k])
        if not len(present):
            continue
        for name in names:
            selection = (k, present) + (slice(None),) * (2 if name == UNIT_OUTER else 1)
            merged[name][present] += group[name].get_orthogonal_selection(selection)
    group[CLASS_COUNT][:] = counts
    for name in names:
        group[CLASS_STATISTIC_OF[name]][:] = per_class(merged[name], counts).astype(np.float32)
    group.attrs.update({**_skipped_attrs(group, int(attrs["num_images"])),
                        "empty_classes": [name for name, count in zip(class_names, counts) if count == 0],
                        "complete": True})  # last: readers trust a split only once this is set
    return True


def _skipped_attrs(group: zarr.Group, num_images: int) -> dict:
    """The split attributes that the units' skipped lists and colour flags give."""
    skipped_rows: list[tuple[int, str]] = []
    for entry in group[UNIT_SKIPPED][:]:
        if entry:
            skipped_rows.extend((int(row), str(reason)) for row, reason in json.loads(str(entry)))
    skipped_rows.sort()
    ids = group[SAMPLE_IDS]
    skipped = [{"sample_id": str(ids[row]), "reason": reason} for row, reason in skipped_rows]
    greyscale = (not bool(np.asarray(group[UNIT_COLOUR][:]).any())) if UNIT_COLOUR in group else None
    return {
        "greyscale": greyscale,  # every image grey (R = G = B); None: not recorded (an older store)
        "skipped": skipped,
        "num_skipped": len(skipped),
        "num_valid": num_images - len(skipped),
    }


def check_unit_partials(partials: dict[str, np.ndarray], view0: np.ndarray, labels: np.ndarray,
                        present: np.ndarray, dtype: np.dtype) -> None:
    """A unit's stored partial sums must be those of its stored view-0 features. The build summed the
    float32 backbone output before the cast to the storage dtype, so the two differ by that cast's
    rounding: at most eps/2 of each |x| per row (eps of the storage dtype; for fp32 storage only the
    float64 summation order), plus a subnormal's step per row. Twice that is the bound; a lost chunk
    (read as 0) or features rewritten with valid checksums are far outside it."""
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.finfo(np.float32)
    eps, floor = float(info.eps), float(info.smallest_subnormal)
    x = view0.astype(np.float64)
    full_cov = UNIT_OUTER in partials
    want = class_sums(x, labels, present, full_cov)
    scale = class_sums(np.abs(x), labels, present, full_cov)  # the magnitudes summed: the rounding's scale
    for j, c in enumerate(present):
        for name, stored in partials.items():
            diff = np.abs(stored[j] - want[name][j])
            bound = 2 * (eps * (1 if name == UNIT_SUM else 2) * scale[name][j] + int(np.count_nonzero(labels == c)) * floor)
            if (diff > bound).any():
                if not stored[j].any():
                    raise Bad(name, f"class {int(c)} missing: a lost chunk reads as 0, the unit's features "
                                    f"of that class do not sum to 0")
                raise Bad(FEATURES, f"disagree with the unit's partial sums ({name}, class {int(c)}, "
                                    f"max abs diff {float(diff.max()):.3g}): features or {name} changed "
                                    f"since the build")


def check_class_statistic(name: str, values: np.ndarray, merged: dict[str, np.ndarray], counts: np.ndarray) -> None:
    """A class statistic must be the merged unit sums over the class count, cast to float32 (what
    `finalize_split` writes): within the float32 cast's rounding, eps32 of the class's largest value."""
    partial = _PARTIAL_OF[name]
    if partial not in merged:
        return
    want = per_class(merged[partial], counts)
    diff = np.abs(values.astype(np.float64) - want)
    axes = tuple(range(1, values.ndim))
    bound = float(np.finfo(np.float32).eps) * np.abs(want).max(axis=axes, keepdims=True) + 1e-30
    bad = (diff > bound).any(axis=axes)
    if bad.any():
        c = int(np.flatnonzero(bad)[0])
        raise Bad(name, f"disagrees with the units' partial sums (class {c}, max abs diff "
                        f"{float(diff[c].max()):.3g})")
