"""The checks of a split's stored data, written once: a read (`StoreSplit.load`, `labels`, `sample_ids`,
the class statistics) and `verify` run the same functions, which raise `Bad(array, what)`; the read path
turns it into a StoreError naming the rows and the repair command, `verify` into a `Damage` line."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .errors import one_line
from .schema import CLASS_COUNT, FEATURES, LABELS, SAMPLE_IDS, SKIPPED_LABEL, UNIT_COLOUR, UNIT_COLOUR_MISSING, UNIT_SKIPPED


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


class Bad(Exception):
    """One check failed: `array` holds damage described by `what`; `row`: the first damaged row of what
    was checked (an offset into it), when the check knows it."""

    def __init__(self, array: str, what: str, row: int | None = None) -> None:
        super().__init__(f"{array}: {what}")
        self.array = array
        self.what = what
        self.row = row


def describe_read_error(exc: BaseException) -> str:
    """What went wrong reading a chunk, in a few words (zarr's messages quote raw bytes)."""
    text = str(exc)
    if "checksum" in text.lower():
        return "checksum mismatch: the chunk was changed or truncated on disk"
    return one_line(exc)


def check_labels(labels: np.ndarray, num_classes: int) -> None:
    """Labels in -1 (skipped) .. num_classes - 1; a lost chunk of another fill value is out of range."""
    bad = np.flatnonzero((labels < SKIPPED_LABEL) | (labels >= num_classes))
    if len(bad):
        raise Bad(LABELS, f"label {int(labels[bad[0]])} out of range -1..{num_classes - 1}", row=int(bad[0]))


def check_features_finite(features: np.ndarray) -> None:
    """`features`: the rows that hold an image; a missing chunk reads as NaN (the fill value)."""
    if not np.isfinite(features).all():
        raise Bad(FEATURES, "non-finite values in rows that hold an image: a missing or overwritten chunk")


def check_sample_ids(ids: list[str]) -> None:
    """An empty id is a chunk lost on disk (its fill value)."""
    if "" in ids:
        raise Bad(SAMPLE_IDS, "empty sample ids: a missing chunk", row=ids.index(""))


def unit_skipped_rows(entry: str) -> set[int]:
    """The rows a unit's skipped list names (`unit_skipped[k]`: a JSON list of [row, reason], or "")."""
    try:
        return {int(row) for row, _ in json.loads(entry)} if entry else set()
    except (ValueError, TypeError):
        raise Bad(UNIT_SKIPPED, "not a JSON list of [row, reason]") from None


def check_skipped_rows(labels: np.ndarray, start: int, listed: set[int]) -> None:
    """The rows labelled -1 in a unit (`labels` of the unit starting at row `start`) are exactly those its
    skipped list names; a missing labels chunk reads as -1."""
    marked = set((np.flatnonzero(labels == SKIPPED_LABEL) + start).tolist())
    if marked != listed:
        raise Bad(LABELS, f"{len(marked ^ listed)} row(s) where the -1 (skipped) labels and the unit's skipped "
                          f"list disagree: a missing or overwritten chunk")


def check_statistic_values(name: str, values: np.ndarray) -> None:
    """Class statistics read with their fill values: -1 counts, NaN moments, i.e. a chunk missing."""
    if (values < 0).any() if name == CLASS_COUNT else not np.isfinite(values).all():
        raise Bad(name, "missing or invalid values (a missing chunk?)")


def check_unit_colour(colour: int) -> None:
    if colour == UNIT_COLOUR_MISSING:
        raise Bad(UNIT_COLOUR, "missing (a missing chunk)")
    if colour not in (0, 1):
        raise Bad(UNIT_COLOUR, f"value {colour}, expected 0 or 1")
