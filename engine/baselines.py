"""Real-image baselines for the evaluation table, written in the same ImageFolder layout as distilled sets.

- `random`: `ipc` real training images per class, drawn without replacement (numpy, seeded).
- `centroid`: per class, the `ipc` real images whose stored embeddings (view 0) are nearest the class
  mean in L2 (faiss IndexFlatL2 over that class's features), nearest first.
- `neighbors`: for every image of an existing set (`images`, e.g. a distilled set), the real image of
  the same class whose stored embedding has the highest cosine similarity with the image's embedding
  (faiss IndexFlatIP on L2-normalized vectors). As in the authors' baseline, two distilled images may
  pick the same real image; `baseline.json` records each pick. The set's images are embedded like
  real view-0 features: resized to the backbone's resize_size, centre crop, no augmentation.

Real pixels come from the store split's source (`StoreSplit.open_dataset()`), as canonical images at the
store's resize_size, so datasets without files on disk (fashion-mnist, synthetic) are exported as PNG.
Output: `OUT/images/<class>/<k>.png` (via engine.imagefolder) and `OUT/baseline.json` (chosen sample ids
per class and everything needed to reproduce). Written to a temporary sibling directory and renamed, so
a failed run leaves nothing half-written; an existing non-empty OUT is refused.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from engine.distill.outdir import GRID_FILE, IMAGES_DIR
from featurestore.augment import resize
from featurestore.errors import StoreError, UserError
from featurestore.options import option
from featurestore.progress import progress
from featurestore.runtime import (atomic_write_json, pick_device, require_new_dir, require_writable, temp_dir_beside,
                                  write_errors)
from featurestore.store import open_store

BASELINE_KINDS: tuple[str, ...] = ("random", "centroid", "neighbors")


def _faiss_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def pick_random(labels: np.ndarray, num_classes: int, ipc: int, seed: int) -> dict[int, np.ndarray]:
    """Per class, `ipc` positions into `labels` drawn without replacement (fewer if the class is smaller)."""
    rng = np.random.default_rng(seed)
    picks = {}
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        picks[c] = np.sort(rng.choice(members, size=min(ipc, members.size), replace=False)) if members.size \
            else np.empty(0, dtype=np.int64)
    return picks


def pick_centroid(features: np.ndarray, labels: np.ndarray, num_classes: int,
                  ipc: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per class, (positions, squared L2 distances) of the `ipc` features nearest the class mean."""
    picks = {}
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            picks[c] = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
            continue
        feats = np.ascontiguousarray(features[members], dtype=np.float32)
        # Mean in float64: the centre of thousands of rows should not carry float32 summation error.
        mean = feats.astype(np.float64).mean(axis=0, keepdims=True)
        index = faiss.IndexFlatL2(feats.shape[1])
        index.add(feats)
        dist, pos = _faiss_search(index, mean, min(ipc, members.size))
        picks[c] = (members[pos[0]], dist[0])
    return picks


def pick_cluster_centroids(features: np.ndarray, labels: np.ndarray, num_classes: int, ipc: int,
                           seed: int = 0) -> dict[int, np.ndarray]:
    """Per class, the positions of `ipc` distinct real samples that cover it: 1 -> the sample nearest the
    class mean (`pick_centroid`); more -> k-means with k = ipc on the class's features (faiss, seeded), then
    the sample nearest each cluster centre, each sample used once (the ipc nearest the one mean would be
    near-copies of one picture)."""
    if ipc == 1:
        return {c: pos for c, (pos, _) in pick_centroid(features, labels, num_classes, 1).items()}
    picks = {}
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        feats = np.ascontiguousarray(features[members], dtype=np.float32)
        if members.size <= ipc:
            picks[c] = members[:ipc]
            continue
        kmeans = faiss.Kmeans(feats.shape[1], ipc, niter=20, seed=seed, verbose=False)
        kmeans.train(feats)
        index = faiss.IndexFlatL2(feats.shape[1])
        index.add(feats)
        _, near = _faiss_search(index, kmeans.centroids, min(members.size, 8 * ipc))
        chosen: list[int] = []
        for row in near:  # the nearest sample of each centre not taken by an earlier centre
            chosen.append(next((int(p) for p in row if int(p) not in chosen), -1))
        rest = (p for p in range(members.size) if p not in chosen)
        chosen = [p if p >= 0 else next(rest) for p in chosen]
        picks[c] = members[np.array(chosen, dtype=np.int64)]
    return picks


def pick_neighbors(features: np.ndarray, labels: np.ndarray, queries: np.ndarray,
                   query_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query, (position, cosine) of the same-class feature with the highest cosine similarity."""
    chosen = np.empty(len(queries), dtype=np.int64)
    cosine = np.empty(len(queries), dtype=np.float32)
    feats = np.ascontiguousarray(features, dtype=np.float32).copy()
    faiss.normalize_L2(feats)
    q = np.ascontiguousarray(queries, dtype=np.float32).copy()
    faiss.normalize_L2(q)
    for c in np.unique(query_labels):
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            raise StoreError(f"class {int(c)} has no training samples in the store: no neighbor to pick")
        index = faiss.IndexFlatIP(feats.shape[1])
        index.add(feats[members])
        rows = np.flatnonzero(query_labels == c)
        sim, pos = _faiss_search(index, q[rows], 1)
        chosen[rows] = members[pos[:, 0]]
        cosine[rows] = sim[:, 0]
    return chosen, cosine


@dataclass
class BaselineConfig:
    """The options of `engine baseline` besides store, backbone, kind and out (the CLI derives its options
    from them)."""

    ipc: int = option(1, "Images per class (random, centroid).")
    seed: int = option(0, "Seed of the random baseline.")
    images: str | None = option(None, "Set whose nearest real images to pick (neighbors).")
    device: str = option("auto", "auto, cpu, cuda ... (neighbors embeds --images).")
    quiet: bool = option(False, "No progress bars.", flag="--quiet")


def make_baseline(store, backbone: str, kind: str, out: str | os.PathLike, **options: Any) -> dict:
    """Build a baseline image set in `out` (`options`: the fields of `BaselineConfig`); returns the content
    of `baseline.json`."""
    from engine.imagefolder import class_folder_names

    cfg = BaselineConfig(**options)
    _check_options(kind, cfg)
    out = require_new_dir(out)
    require_writable(out)
    store = open_store(store)
    split = store.split(backbone, "train")
    if split.num_valid == 0:
        raise StoreError(f"{split.backbone}/train of {store.path} has no usable rows (every sample was skipped): "
                         f"no real image to pick")
    data = split.load(view=0)

    record: dict = {"kind": kind, "store": str(store.path), "dataset": store.dataset, "backbone": split.backbone,
                    "split": "train", "fingerprint": split.fingerprint, "resize_size": split.resize_size,
                    "class_names": store.class_names, "class_folders": class_folder_names(store.class_names)}
    picks = _pick(kind, cfg, store, split, data, record)
    tensors, out_labels, per_class = _load_picks(kind, store, split, data.rows.numpy(), picks, cfg.quiet)
    record["num_images"] = len(tensors)
    record["picks"] = per_class

    with write_errors(f"the baseline to {out}", "rerun the same command (nothing was left in --out)"):
        _write_baseline(out, tensors, out_labels, store.class_names, record)
    return record


def _check_options(kind: str, cfg: BaselineConfig) -> None:
    """Refuse (one line) an unknown kind, --images with the wrong kind, an --ipc or --seed out of range."""
    ipc, seed, images = cfg.ipc, cfg.seed, cfg.images
    if kind not in BASELINE_KINDS:
        raise UserError(f"unknown baseline kind '{kind}': choose one of {', '.join(BASELINE_KINDS)}")
    if kind == "neighbors" and images is None:
        raise UserError("--kind neighbors needs --images DIR: the set (e.g. distilled images) whose nearest "
                        "real images to pick")
    if kind != "neighbors" and images is not None:
        raise UserError(f"--images is only used by --kind neighbors, not {kind}")
    if ipc < 1:
        raise UserError(f"--ipc must be at least 1, got {ipc}")
    if ipc > 2**31 - 1:
        raise UserError(f"--ipc must be at most {2**31 - 1}, got {ipc}")
    if not 0 <= seed <= 2**63 - 1:  # a generator's seed
        raise UserError(f"--seed must be in 0..{2**63 - 1}, got {seed}")


def _pick(kind: str, cfg: BaselineConfig, store, split, data, record: dict) -> list[tuple[int, int, dict]]:
    """The baseline's picks: (class, position into `data`, extra fields for baseline.json); adds the
    kind's fields to `record`."""
    from engine.imagesets import embed_views, read_image_set

    num_classes = store.num_classes
    labels = data.labels.numpy()
    picks: list[tuple[int, int, dict]] = []
    if kind == "random":
        record.update(ipc=cfg.ipc, seed=cfg.seed)
        for c, pos in pick_random(labels, num_classes, cfg.ipc, cfg.seed).items():
            picks += [(c, int(p), {}) for p in pos]
    elif kind == "centroid":
        record.update(ipc=cfg.ipc, distance="squared L2 to the class mean of the stored view-0 features")
        for c, (pos, dist) in pick_centroid(data.features.numpy(), labels, num_classes, cfg.ipc).items():
            picks += [(c, int(p), {"distance": float(d)}) for p, d in zip(pos, dist)]
    else:
        image_set = read_image_set(cfg.images, store.class_names)
        record.update(images=str(image_set.path), similarity="cosine of view-0 (centre crop) embeddings")
        model = split.open_backbone(pick_device(cfg.device))
        queries = embed_views(model, resize(image_set.images, model.resize_size), 1, None)[0].cpu().numpy()
        query_labels = image_set.labels.numpy()
        pos, cos = pick_neighbors(data.features.numpy(), labels, queries, query_labels)
        picks += [(int(c), int(p), {"query": k, "cosine": float(s)})
                  for k, (c, p, s) in enumerate(zip(query_labels, pos, cos))]
    return picks


def _load_picks(kind: str, store, split, rows: np.ndarray, picks: list[tuple[int, int, dict]],
                quiet: bool) -> tuple[list[torch.Tensor], list[int], dict[str, list[dict]]]:
    """The picked images (canonical, at the split's resize size), their labels, and baseline.json's
    per-class records of the picks."""
    from featurestore.datasets import canonical_image

    sample_ids = split.sample_ids()
    # Real pixels are found in the source by sample id, never by position.
    dataset, source_index = split.source([int(rows[p]) for _, p, _ in picks])
    tensors, out_labels = [], []
    per_class: dict[str, list[dict]] = {name: [] for name in store.class_names}
    bar = progress(len(picks), f"{kind} baseline", "img", disable=quiet)
    for (c, p, extra), index in zip(picks, source_index):
        row = int(rows[p])
        tensors.append(canonical_image(dataset.load_image(index), split.resize_size))
        bar.update(1)
        out_labels.append(c)
        per_class[store.class_names[c]].append({"sample_id": sample_ids[row], "row": row, **extra})
    bar.close()
    return tensors, out_labels, per_class


def _write_baseline(out: Path, tensors: list[torch.Tensor], out_labels: list[int], class_names: list[str],
                    record: dict) -> None:
    """Write the set next to `out` and rename it into place: a failed write leaves `out` as it was."""
    from engine.imagefolder import write_imagefolder
    from engine.outputs import save_grid

    tmp = temp_dir_beside(out)
    try:
        images_t, labels_t = torch.stack(tensors), torch.tensor(out_labels)
        write_imagefolder(tmp / IMAGES_DIR, images_t, labels_t, class_names)
        save_grid(tmp / GRID_FILE, images_t, labels_t, class_names)
        atomic_write_json(tmp / "baseline.json", record)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

