"""The feature store's schema, in one place: layout, attributes, array specifications, and the checks
that keep one store from mixing datasets, weights or settings. Readers (`featurestore.store`), the
writer (`featurestore.build`) and `fs info` all use these names.

Layout (schema version 1; the README documents it as a public format)::

    <store>/                      root group; attrs: schema_version, format, tool_version,
                                  dataset {name, root, limit_per_class}, class_names
      <backbone>/                 one group per backbone (registry name)
        <split>/                  one group per split; attrs below
          features                float16 (or float32) [N, D], or [N, K, D] with K views; fill NaN
          labels                  int64 [N]; -1 marks a skipped (undecodable) sample
          sample_ids              string [N]: path relative to the dataset root, or "<index>"
          class_count             int64 [C]
          class_mean              float32 [C, D]  (0 for an empty class)
          class_sq_mean           float32 [C, D]  diagonal second moment E[x^2]
          class_second_moment     float32 [C, D, D]  E[x x^T], only with --full-cov
          unit_done               uint8 [U]: completion marker of each work unit, written last
          unit_count              int64 [U, C]        per-unit partial statistics, so resumed and
          unit_sum                float64 [U, C, D]   multi-process builds merge exactly (by addition
          unit_sqsum              float64 [U, C, D]   in unit order, independent of who computed what)
          unit_outer              float64 [U, C, D, D]  (only with --full-cov)
          unit_skipped            string [U]: JSON list of [row, reason] for the unit's skipped samples
          unit_colour             uint8 [U]: 1 when the unit held a colour image (R, G, B not all
                                  equal), else 0; fill 255 = missing (stores built before 2026-12-06
                                  filled 0); absent in stores built before colour was recorded

unit_sum / unit_sqsum / unit_outer fill with 0 and store only the classes a unit saw (one chunk per unit
and class: NaN-filling them would store U x C chunks). A deleted chunk of a class the unit saw therefore
reads as 0; `StoreSplit.verify` catches it by recomputing every unit's partial sums from its features.

Split-group attributes: `backbone` (Backbone.describe(): spec, fingerprint, normalization, resolution,
weights path), `transform`, `num_images`, `num_classes`, `dim`, `views`, `dtype`, `chunk_rows`,
`num_units`, `full_cov`, `seed`, `empty_classes`, `complete`; once complete also `num_valid`,
`num_skipped`, `skipped` ([{sample_id, reason}]) and `greyscale` (true when every image is grey, i.e. no
unit set `unit_colour`; null for a store without `unit_colour`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from .augment import AugmentConfig
from .backbones import Backbone
from .datasets import ImageDataset, canonical_name, describe_canonical
from .errors import StoreError
from .runtime import tool_version

SCHEMA_VERSION = 1
FORMAT_NAME = "probe-distill feature store"

FEATURES = "features"
LABELS = "labels"
SAMPLE_IDS = "sample_ids"
CLASS_COUNT = "class_count"
CLASS_MEAN = "class_mean"
CLASS_SQ_MEAN = "class_sq_mean"
CLASS_SECOND_MOMENT = "class_second_moment"
UNIT_DONE = "unit_done"
UNIT_COUNT = "unit_count"
UNIT_SUM = "unit_sum"
UNIT_SQSUM = "unit_sqsum"
UNIT_OUTER = "unit_outer"
UNIT_SKIPPED = "unit_skipped"
UNIT_COLOUR = "unit_colour"
UNIT_COLOUR_MISSING = 255  # unit_colour's fill value: a chunk lost on disk, never a written value

SKIPPED_LABEL = -1

DEFAULT_CHUNK_ROWS = 1024
DTYPES = {"fp16": np.float16, "fp32": np.float32}
DTYPE_FLAGS = {"float16": "fp16", "float32": "fp32"}


def unit_rows(unit: int, chunk_rows: int, n: int) -> tuple[int, int]:
    """[start, stop) rows of work unit `unit` (the last unit may be short)."""
    start = unit * chunk_rows
    return start, min(n, start + chunk_rows)


def samples_digest(ds: ImageDataset) -> str:
    """Identity of a split's content: its sample ids and labels, hashed."""
    h = hashlib.sha256()
    h.update("\n".join(ds.sample_ids).encode())
    h.update(np.ascontiguousarray(ds.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def dataset_identity(ds: ImageDataset) -> dict[str, Any]:
    """What a split records about its dataset (split attribute `dataset`): name, root, and the split's
    own `limit_per_class` (splits of one store may differ there: 500 train images per class, the whole
    test set)."""
    return {"name": ds.name, "root": ds.root, "limit_per_class": ds.limit_per_class}


def split_attrs(ds: ImageDataset, backbone: Backbone, *, views: int, dtype: str, full_cov: bool,
                chunk_rows: int, seed: int) -> dict[str, Any]:
    """The attributes of a new split group (see the module docstring)."""
    n = len(ds)
    transform: dict[str, Any] = {
        "canonical": describe_canonical(backbone.resize_size),
        "view0": f"centre crop {backbone.image_size}x{backbone.image_size} of the canonical image",
    }
    if views > 1:
        transform["augmented_views"] = (
            f"views 1..{views - 1}: featurestore.augment.augment(canonical, {backbone.image_size}, gen) with "
            f"gen seeded by blake2b('{{seed}}:{{index}}:{{view}}') (seed {seed})")
        transform["augment_config"] = AugmentConfig().to_json()
    return {
        "backbone": backbone.describe(),
        "split": ds.split,
        "dataset": dataset_identity(ds),
        "transform": transform,
        "num_images": n,
        "num_classes": ds.num_classes,
        "dim": backbone.dim,
        "views": views,
        "dtype": np.dtype(DTYPES[dtype]).name,
        "chunk_rows": chunk_rows,
        "num_units": -(-n // chunk_rows),
        "full_cov": full_cov,
        "seed": seed,
        "samples_digest": samples_digest(ds),
        "source_digest": ds.source_digest(),
        "empty_classes": ds.empty_classes,
        "class_statistics": "over view 0, from the float32 backbone output before the cast to dtype, "
                            "accumulated in float64 per unit and merged by addition in unit order",
        "complete": False,
    }


def check_backbone_compatible(where: str, old_bb: dict[str, Any], new_bb: dict[str, Any]) -> None:
    """Same registry name is not enough: the fingerprint (weights + spec) and resolution must match."""
    if old_bb["fingerprint"] != new_bb["fingerprint"]:
        raise StoreError(f"{where} was built with a different backbone (fingerprint {old_bb['fingerprint']}, "
                         f"weights {old_bb.get('weights_path')}) than this one ({new_bb['fingerprint']}, "
                         f"weights {new_bb.get('weights_path')}): use another --store")
    if old_bb["image_size"] != new_bb["image_size"] or old_bb["resize_size"] != new_bb["resize_size"]:
        raise StoreError(f"{where} was built at {old_bb['image_size']} px, this build asks for "
                         f"{new_bb['image_size']} px: pass --image-size {old_bb['image_size']} or use another --store")


def check_split_compatible(where: str, existing: dict[str, Any], wanted: dict[str, Any],
                            chunk_rows_explicit: bool, will_write: bool = True) -> None:
    """Refuse (StoreError, nothing written) to continue a split built with different settings, or (when
    the build will write into it: resume, repair) from source images that changed since it was started."""
    check_backbone_compatible(where, existing["backbone"], wanted["backbone"])
    checks = [("views", "--views"), ("dtype", "--dtype"), ("full_cov", "--full-cov")]
    if wanted["views"] > 1:
        checks.append(("seed", "--seed"))
    if chunk_rows_explicit:
        checks.append(("chunk_rows", "--chunk-rows"))
    for key, flag in checks:
        if existing.get(key) != wanted[key]:
            old, new = existing.get(key), wanted[key]
            if key == "dtype":
                old, new = (DTYPE_FLAGS.get(str(v), v) for v in (old, new))
            raise StoreError(f"{where} was built with {flag} {old} (asked: {new}): repeat the "
                             f"original options, or use another --store")
    old_limit = existing.get("dataset", {}).get("limit_per_class")
    new_limit = wanted.get("dataset", {}).get("limit_per_class")
    if "dataset" in existing and old_limit != new_limit:
        raise StoreError(f"{where} was built with limit per class {old_limit} (--limit-per-class; asked: "
                         f"{new_limit}): repeat the original options, or use another --store")
    if existing["num_images"] != wanted["num_images"] or existing.get("samples_digest") != wanted["samples_digest"]:
        raise StoreError(f"{where} holds {existing['num_images']} samples but the dataset now lists "
                         f"{wanted['num_images']} (or different files): the source images changed since "
                         f"the store was built; use another --store")
    old_source, new_source = existing.get("source_digest"), wanted.get("source_digest")
    if will_write and old_source is not None and old_source != new_source:
        raise StoreError(f"the source images of {where} changed since the split was started (same file "
                         f"names, other sizes or modification times): its features so far come from the old "
                         f"images; delete {where.split(' ')[-1]} in the store (or use another --store) and build "
                         f"again")


def checksum_codecs() -> list[Any]:
    """The bytes-to-bytes codecs of every array: a CRC32C checksum appended to each chunk, so a chunk
    overwritten or truncated on disk fails to decode (readers turn that into a StoreError naming the
    unit) instead of reading as plausible numbers. Stores written before checksums existed have none and
    stay readable (same schema version: zarr reads either)."""
    from zarr.codecs import Crc32cCodec

    return [Crc32cCodec()]


def array_specs(attrs: dict[str, Any], num_classes: int) -> dict[str, dict[str, Any]]:
    n, d, k, r, u = (attrs["num_images"], attrs["dim"], attrs["views"], attrs["chunk_rows"], attrs["num_units"])
    c = num_classes
    feat_shape, feat_chunks = ((n, d), (r, d)) if k == 1 else ((n, k, d), (r, k, d))
    specs: dict[str, dict[str, Any]] = {
        # Dense float embeddings barely compress (x1.06-1.12): no compression keeps writing cheap; only
        # the checksum (4 bytes per chunk) is added.
        FEATURES: dict(shape=feat_shape, chunks=feat_chunks, dtype=attrs["dtype"], fill_value=np.nan),
        LABELS: dict(shape=(n,), chunks=(r,), dtype="int64", fill_value=SKIPPED_LABEL),
        SAMPLE_IDS: dict(shape=(n,), chunks=(r,), dtype=str, fill_value=""),
        UNIT_DONE: dict(shape=(u,), chunks=(1,), dtype="uint8", fill_value=0),
        UNIT_COUNT: dict(shape=(u, c), chunks=(1, c), dtype="int64", fill_value=0),
        # One chunk per (unit, class): a unit writes only the classes it saw (zero chunks are not stored).
        UNIT_SUM: dict(shape=(u, c, d), chunks=(1, 1, d), dtype="float64", fill_value=0.0),
        UNIT_SQSUM: dict(shape=(u, c, d), chunks=(1, 1, d), dtype="float64", fill_value=0.0),
        UNIT_SKIPPED: dict(shape=(u,), chunks=(1,), dtype=str, fill_value=""),
        # 1 when a unit held at least one colour image (R, G, B not all equal): a split of only grey images
        # is recorded as `greyscale`, and the engine can keep its synthetic images grey too.
        # Filled with UNIT_COLOUR_MISSING so that a grey unit's 0 is stored and a lost chunk is seen.
        UNIT_COLOUR: dict(shape=(u,), chunks=(1,), dtype="uint8", fill_value=UNIT_COLOUR_MISSING),
        CLASS_COUNT: dict(shape=(c,), chunks=(c,), dtype="int64", fill_value=-1),
        CLASS_MEAN: dict(shape=(c, d), chunks=(c, d), dtype="float32", fill_value=np.nan),
        CLASS_SQ_MEAN: dict(shape=(c, d), chunks=(c, d), dtype="float32", fill_value=np.nan),
    }
    if attrs["full_cov"]:
        specs[UNIT_OUTER] = dict(shape=(u, c, d, d), chunks=(1, 1, d, d), dtype="float64", fill_value=0.0)
        specs[CLASS_SECOND_MOMENT] = dict(shape=(c, d, d), chunks=(1, d, d), dtype="float32",
                                                 fill_value=np.nan)
    for spec in specs.values():
        spec["compressors"] = checksum_codecs()
    return specs


def rebuild_command(store: str, dataset: dict[str, Any], backbone: str, split_attrs: dict[str, Any],
                    split: str | None = None, extra: str = "--repair") -> str:
    """The `fs build` command line that resumes or repairs a split of this store: the options a resumed
    build must repeat (dataset root and limit, weights, size, views, dtype, full-cov, seed), then `extra`."""
    dataset = {**dataset, **split_attrs.get("dataset", {})}  # the split's own limit per class wins
    parts = ["fs build", str(dataset.get("name")), "--backbone", backbone, "--store", store]
    if dataset.get("root"):
        parts += ["--data-root", str(dataset["root"])]
    if dataset.get("limit_per_class"):
        parts += ["--limit-per-class", str(dataset["limit_per_class"])]
    if split:
        parts += ["--split", split]
    bb = split_attrs.get("backbone", {})
    if bb.get("weights_path"):
        parts += ["--weights", str(bb["weights_path"])]
    default_size = bb.get("spec", {}).get("image_size")
    if bb.get("image_size") is not None and bb.get("image_size") != default_size:
        parts += ["--image-size", str(bb["image_size"])]
    if int(split_attrs.get("views", 1)) > 1:
        parts += ["--views", str(split_attrs["views"])]
        if split_attrs.get("seed"):
            parts += ["--seed", str(split_attrs["seed"])]
    if DTYPE_FLAGS.get(str(split_attrs.get("dtype")), "fp16") != "fp16":
        parts += ["--dtype", DTYPE_FLAGS[str(split_attrs["dtype"])]]
    if split_attrs.get("full_cov"):
        parts.append("--full-cov")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def root_attrs(ds: ImageDataset) -> dict[str, Any]:
    """The attributes of a new store's root group (the dataset's name and root; limits are per split)."""
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "tool_version": tool_version(),
        "dataset": {"name": ds.name, "root": ds.root},
        "class_names": list(ds.class_names),
    }


def check_root_compatible(path: str, meta: dict[str, Any], ds: ImageDataset) -> None:
    """Refuse (StoreError) to add a split of another dataset or root to an existing store. (Each split
    keeps its own --limit-per-class; resuming a split with another limit is refused by
    check_split_compatible, as its samples differ.)"""
    attrs = meta["attributes"]
    stored, wanted = dict(attrs.get("dataset", {})), dataset_identity(ds)
    try:  # a store built under a dataset's former name (an alias) holds the same dataset
        stored["name"] = canonical_name(stored.get("name"))
    except Exception:  # noqa: BLE001 - an unknown name simply differs, below
        pass
    for key, flag in (("name", "DATASET"), ("root", "--data-root")):
        if stored.get(key) != wanted[key]:
            raise StoreError(f"store {path} holds dataset {stored.get('name')} (root {stored.get('root')}); "
                             f"this build is for {wanted['name']} (root {wanted['root']}): differing {flag}; "
                             f"use another --store")
    if list(attrs.get("class_names", [])) != list(ds.class_names):
        raise StoreError(f"store {path} lists different class names than dataset {ds.name} now has: "
                         f"the class folders changed; use another --store")
