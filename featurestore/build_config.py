"""`BuildConfig`: every option of `fs build`, written once (the CLI derives its options from the fields),
and the checks that need nothing but the options."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UserError
from .options import option
from .schema import DEFAULT_CHUNK_ROWS, DTYPES
from .units import parse_shard


# Upper bounds of the numeric options (BuildConfig.validate). Views: each is a backbone pass per image;
# a batch or a chunk (one work unit, buffered in float32) beyond these would not fit any machine's memory.
MAX_VIEWS = 1024
MAX_BATCH_SIZE = 1 << 16
MAX_CHUNK_ROWS = 1 << 20
MAX_INT32 = 2**31 - 1
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**63 - 1  # torch and numpy generators take seeds below 2**64; the views' seed string any


def max_workers() -> int:
    """Decoding processes per build process: four per CPU (at least 32) is far past any gain."""
    return max(32, 4 * (os.cpu_count() or 1))


@dataclass
class BuildConfig:
    """Every option of `fs build` (the CLI derives its options from these fields)."""

    dataset: str = option(help="dataset name (see `fs datasets`)", argument=True)
    backbone: str = option(help="backbone name (see `fs backbones`)", flag="--backbone,-b")
    store: str = option(help="feature store: a folder (created if missing) or an fsspec URL such as "
                             "s3://bucket/fs (needs s3fs)", flag="--store,-s")
    data_root: str | None = option(None, "dataset root folder")
    splits: list[str] = option(help="split to build (repeatable; default: all present)", flag="--split",
                               factory=list)
    limit_per_class: int | None = option(None, "first N samples of each class")
    image_size: int | None = option(None, "backbone input size in px (default: the backbone's)")
    weights: str | None = option(None, "local weights file for the backbone")
    views: int = option(1, "views per image: centre crop + views-1 seeded augmentations")
    dtype: str = option("fp16", "feature storage dtype: fp16 or fp32")
    full_cov: bool = option(False, "also store per-class D x D second moments", flag="--full-cov")
    chunk_rows: int | None = option(None, f"rows per chunk = work unit (default {DEFAULT_CHUNK_ROWS}; a resumed "
                                          f"split keeps its own)")
    batch_size: int = option(64, "images per backbone forward")
    workers: int | None = option(None, "decoding worker processes (default min(8, cpus))")
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    seed: int = option(0, "seed of the augmented views")
    shard: str | None = option(None, "i/n: do only shard i of n (e.g. Slurm job arrays)")
    quiet: bool = option(False, "no progress bar", flag="--quiet,-q")
    repair: bool = option(False, "check the existing splits as `fs verify` does and recompute only their "
                                 "damaged units (then merge the class statistics again)", flag="--repair")

    def validate(self) -> None:
        """Options that are wrong whatever is on disk: one line each. Every number has an upper bound too,
        so that a typo of many digits is one line instead of a hang, a fork storm or an OverflowError."""
        bounds = (("views", 1, MAX_VIEWS), ("batch_size", 1, MAX_BATCH_SIZE), ("chunk_rows", 1, MAX_CHUNK_ROWS),
                  ("workers", 0, max_workers()), ("limit_per_class", 1, MAX_INT32), ("image_size", 1, MAX_IMAGE_SIZE),
                  ("seed", 0, MAX_SEED))
        for name, low, high in bounds:
            value = getattr(self, name)
            if value is None:
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{flag} must be an integer, got {value!r}")
            if value < low:
                raise UserError(f"{flag} must be >= {low}, got {value}")
            if value > high:
                raise UserError(f"{flag} must be at most {high}, got {value}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if len(set(self.splits)) != len(self.splits):
            raise UserError(f"--split repeated: {', '.join(self.splits)}")
        parse_shard(self.shard)
