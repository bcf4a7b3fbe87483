"""`verify_split` (`StoreSplit.verify`, `fs verify`, `fs build --repair`): every check a read makes
(`featurestore.checks`), on every row, view and array, plus the unit and class statistics against the
stored features (`featurestore.statistics`). Reads everything; writes nothing. A damaged unit is
reported once (its first failed check)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .checks import (Bad, Damage, check_features_finite, check_labels, check_sample_ids, check_skipped_rows,
                     check_statistic_values, check_unit_colour, describe_read_error, unit_skipped_rows)
from .errors import StoreError, one_line
from .schema import (CLASS_COUNT, CLASS_MEAN, CLASS_SECOND_MOMENT, CLASS_SQ_MEAN, FEATURES, LABELS, SAMPLE_IDS,
                     SKIPPED_LABEL, UNIT_COLOUR, UNIT_COLOUR_MISSING, UNIT_COUNT, UNIT_DONE, UNIT_OUTER, UNIT_SKIPPED,
                     UNIT_SQSUM, UNIT_SUM, array_specs, unit_rows)
from .statistics import check_class_statistic, check_unit_partials, unit_counts

if TYPE_CHECKING:
    from .reading import StoreSplit


@dataclass
class _Totals:
    """What the units add up to, for the split-wide checks."""

    counts: np.ndarray
    merged: dict[str, np.ndarray]  # partial sums merged over the units, float64
    skipped: int = 0
    damages: list[Damage] = field(default_factory=list)


def verify_split(split: StoreSplit) -> list[Damage]:
    """Each unit's completion marker, every chunk decodes (checksum), features finite where a row holds
    an image, labels in range and -1 exactly on the rows the unit's skipped list names, sample ids
    present, the unit's partial statistics decodable, finite, consistent with its labels and equal to
    the sums recomputed from its stored features (a lost unit_sum chunk reads as 0, features rewritten
    with valid checksums change the sums), its unit_colour present; then the class statistics present,
    finite and equal to the merged unit counts and sums."""
    arrays = _arrays(split)
    if arrays is None:
        return []
    if isinstance(arrays, Damage):
        return [arrays]
    c = split.store.num_classes
    totals = _Totals(counts=np.zeros(c, dtype=np.int64),
                     merged={name: np.zeros((c, *arrays[name].shape[2:]))
                             for name in (UNIT_SUM, UNIT_SQSUM, UNIT_OUTER) if name in arrays})
    # Stores from before unit_colour had a 'missing' fill value read a lost chunk as a plausible 0.
    colour_checked = UNIT_COLOUR in arrays and arrays[UNIT_COLOUR].fill_value == UNIT_COLOUR_MISSING
    r, u = int(split.attrs["chunk_rows"]), int(split.attrs["num_units"])
    for k in range(u):
        lo, hi = unit_rows(k, r, split.n)
        try:
            _verify_unit(split, arrays, k, lo, hi, totals, colour_checked)
        except Bad as bad:
            totals.damages.append(Damage(split.backbone, split.split_name, str(bad), unit=k, rows=(lo, hi)))
    if split.complete:
        try:
            _verify_class_statistics(split, arrays, totals)
        except Bad as bad:
            totals.damages.append(Damage(split.backbone, split.split_name, f"class statistics: {bad}",
                                         repairable=True))
    return totals.damages


def _arrays(split: StoreSplit) -> dict[str, zarr.Array] | Damage | None:
    """The split's arrays, or the Damage (the split as a whole) that keeps them from being checked; None
    for a split whose arrays are still being created (nothing to check)."""
    def whole(what: str) -> Damage:
        return Damage(split.backbone, split.split_name, what, repairable=False)

    problem = split.store.class_names_problem(split.attrs.get("num_classes"))
    if problem is not None:
        return whole(f"{problem}: rebuild the store")
    where = split.store.location.child(split.backbone, split.split_name)
    try:
        _ = split.n, int(split.attrs["chunk_rows"]), int(split.attrs["num_units"])  # present, and numbers
        specs = array_specs(split.attrs, split.store.num_classes)
        if UNIT_COLOUR not in split.group:  # stores built before colour was recorded
            specs.pop(UNIT_COLOUR)
        if not split.complete and split.units_done() == 0 and any(name not in split.group for name in specs):
            # A build stopped (killed, disk full) while it created the split's arrays: no unit is done
            # and the next `fs build` creates what is missing. Incomplete, not damaged.
            return None
        arrays = {name: split._array(name) for name in specs}
    except StoreError as exc:
        return whole(str(exc).split(": ", 1)[-1])
    except (KeyError, TypeError, ValueError) as exc:
        return whole(f"split attributes incomplete ({one_line(exc)}): delete {where} and rebuild the split")
    for name, spec in specs.items():
        if tuple(arrays[name].shape) != tuple(spec["shape"]):
            return whole(f"{name}: shape {arrays[name].shape}, expected {spec['shape']}: delete {where} and "
                         f"rebuild the split")
    return arrays


def _read(arrays: dict[str, zarr.Array], name: str, selection: Any) -> np.ndarray:
    try:
        return np.asarray(arrays[name][selection])
    except Exception as exc:  # noqa: BLE001 - codec errors come in several types
        raise Bad(name, describe_read_error(exc)) from None


def _verify_unit(split: StoreSplit, arrays: dict[str, zarr.Array], k: int, lo: int, hi: int, totals: _Totals,
                 colour_checked: bool) -> None:
    """Unit `k` (rows lo..hi-1): Bad at its first failed check; its counts and sums added to `totals`."""
    c = split.store.num_classes
    if not int(_read(arrays, UNIT_DONE, k)):
        if split.complete:
            raise Bad(UNIT_DONE, "completion marker missing in a complete split")
        return  # not built yet: the normal resume path finishes it
    labels = _read(arrays, LABELS, slice(lo, hi)).astype(np.int64, copy=False)
    check_labels(labels, c)
    valid = labels != SKIPPED_LABEL
    features = _read(arrays, FEATURES, slice(lo, hi))
    check_features_finite(features[valid])
    check_sample_ids([str(i) for i in _read(arrays, SAMPLE_IDS, slice(lo, hi))])
    listed = unit_skipped_rows(str(_read(arrays, UNIT_SKIPPED, k)))
    check_skipped_rows(labels, lo, listed)
    counts = _read(arrays, UNIT_COUNT, k).astype(np.int64, copy=False)
    if not np.array_equal(counts, unit_counts(labels[valid], c)):
        raise Bad(UNIT_COUNT, "per-class counts disagree with the labels")
    present = np.flatnonzero(counts)
    if len(present):
        view0 = features[valid] if features.ndim == 2 else features[valid][:, 0]
        partials = {name: _unit_partials(arrays[name], k, present) for name in totals.merged}
        check_unit_partials(partials, view0, labels[valid], present, features.dtype)
        for name, values in partials.items():
            totals.merged[name][present] += values
    if colour_checked:
        check_unit_colour(int(_read(arrays, UNIT_COLOUR, k)))
    totals.counts += counts
    totals.skipped += len(listed)


def _unit_partials(array: zarr.Array, unit: int, present: np.ndarray) -> np.ndarray:
    """The stored partial sums of one unit for the classes it saw (float64)."""
    selection = (unit, present) + (slice(None),) * (array.ndim - 2)
    try:
        values = np.asarray(array.get_orthogonal_selection(selection), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - codec errors come in several types
        raise Bad(array.basename, describe_read_error(exc)) from None
    if not np.isfinite(values).all():
        raise Bad(array.basename, "non-finite partial sums")
    return values


def _verify_class_statistics(split: StoreSplit, arrays: dict[str, zarr.Array], totals: _Totals) -> None:
    """The class statistics of a complete split: present and finite; when no unit is damaged, equal to
    the units' merged counts and sums, and num_skipped to the units' skipped lists."""
    for name in (name for name in (CLASS_COUNT, CLASS_MEAN, CLASS_SQ_MEAN, CLASS_SECOND_MOMENT) if name in arrays):
        values = _read(arrays, name, slice(None))
        check_statistic_values(name, values)
        if totals.damages:
            continue
        if name == CLASS_COUNT:
            if not np.array_equal(values, totals.counts):
                raise Bad(name, "disagrees with the units' counts")
        else:
            check_class_statistic(name, values, totals.merged, totals.counts)
    if not totals.damages and int(split.attrs.get("num_skipped", totals.skipped)) != totals.skipped:
        raise Bad("attribute num_skipped", f"says {split.attrs.get('num_skipped')}, the units list "
                                           f"{totals.skipped}")
