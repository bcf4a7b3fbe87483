"""Datasets of image files in class folders: `imagefolder` (any ROOT/<split>/<class>/<image> tree) and
`imagenet` (the same layout, class names from ROOT/LOC_synset_mapping.txt when present)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featurestore.errors import DatasetError

from .base import SPLITS, DatasetReader, FolderImageDataset
from .decode import IMAGE_EXTENSIONS, short_error

_IMAGENET_SYNSET_FILE = "LOC_synset_mapping.txt"


def _visible_dirs(path: Path) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _list_images(class_dir: str, prefix: str) -> list[str]:
    """`prefix + relative path` of the image files under `class_dir` (recursively, following links),
    sorted. Plain strings rather than Path objects: ImageNet's train split has 1.28M files."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, class_dir)
        base = prefix if rel == "." else prefix + rel.replace(os.sep, "/") + "/"
        for filename in filenames:
            if not filename.startswith(".") and os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS:
                found.append(base + filename)
    found.sort()
    return found


def _resolve_root(name: str, root: str | os.PathLike | None) -> Path:
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a root folder: pass --data-root DIR (holding "
                           f"train/<class>/<image> and val/<class>/<image>)")
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset root {path} does not exist: pass --data-root pointing to a folder "
                           f"with <split>/<class>/<image> sub-folders")
    if not path.is_dir():
        raise DatasetError(f"dataset root {path} is not a folder: pass --data-root pointing to a folder "
                           f"with <split>/<class>/<image> sub-folders")
    return path.resolve()


def _folder_splits(root: Path) -> list[str]:
    """Sub-folders of root that hold at least one class sub-folder; train/val first."""
    splits = [d for d in _visible_dirs(root) if _visible_dirs(root / d)]
    return sorted(splits, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))


def _read_synset_mapping(path: Path) -> dict[str, str]:
    """`n01440764 tench, Tinca tinca` lines -> {wnid: first name}."""
    mapping: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {short_error(exc)} (fix or remove the file)") from None
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        wnid, _, names = line.partition(" ")
        first = names.split(",")[0].strip()
        if not first:
            raise DatasetError(f"{path}:{line_no}: expected '<wnid> <name>, <name>...', got {line!r}")
        mapping[wnid] = first
    return mapping


def _imagenet_class_names(root: Path, wnids: list[str]) -> list[str]:
    mapping_file = root / _IMAGENET_SYNSET_FILE
    if not mapping_file.is_file():
        return list(wnids)
    mapping = _read_synset_mapping(mapping_file)
    names = [mapping.get(w, w) for w in wnids]
    # ImageNet-1k has repeated first names ("crane" the bird and the machine, "maillot" twice);
    # tools that write one folder per class name need them distinct, so repeats carry their wnid.
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [f"{n} ({w})" if counts[n] > 1 else n for n, w in zip(names, wnids)]


def _open_folder(name: str, root: str | os.PathLike | None, split: str, limit_per_class: int | None) -> FolderImageDataset:
    root_path = _resolve_root(name, root)
    splits = _folder_splits(root_path)
    split_dir = root_path / split
    if split not in splits:
        if split_dir.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in split_dir.iterdir()):
            raise DatasetError(f"{split_dir} holds images directly: arrange them in one sub-folder per "
                               f"class ({split}/<class>/<image>)")
        found = ", ".join(splits) if splits else "none"
        raise DatasetError(f"{root_path} has no split {split!r} (a {split}/<class>/ folder); "
                           f"splits found: {found}")
    # Class indices come from the union of class folders over all splits, so train and val (and any
    # other split) of one root always agree; a class missing from a split is an empty class there.
    wnids = sorted({c for s in splits for c in _visible_dirs(root_path / s)})
    class_names = _imagenet_class_names(root_path, wnids) if name == "imagenet" else list(wnids)
    sample_ids: list[str] = []
    labels: list[int] = []
    for label, class_dir_name in enumerate(wnids):
        class_dir = split_dir / class_dir_name
        files = _list_images(str(class_dir), f"{split}/{class_dir_name}/") if class_dir.is_dir() else []
        if limit_per_class is not None:
            files = files[:limit_per_class]
        sample_ids += files
        labels += [label] * len(files)
    if not sample_ids:
        raise DatasetError(f"no images found in {split_dir}: expected {split}/<class>/<image> files with "
                           f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return FolderImageDataset(name=name, root=str(root_path), split=split, class_names=class_names,
                              labels=np.array(labels, dtype=np.int64), sample_ids=sample_ids,
                              limit_per_class=limit_per_class)


def folder_splits(name: str, root: str | os.PathLike | None) -> list[str]:
    """Splits present under a folder dataset's root (train and val first)."""
    root_path = _resolve_root(name, root)
    splits = _folder_splits(root_path)
    if not splits:
        raise DatasetError(f"{root_path} has no <split>/<class>/ folders: expected e.g. "
                           f"{root_path}/train/<class>/<image>")
    return splits


IMAGENET = DatasetReader(
    name="imagenet",
    description="ImageNet in ImageFolder layout: ROOT/train/<wnid>/*, ROOT/val/<wnid>/*; class names from "
                "ROOT/LOC_synset_mapping.txt when present",
    splits=lambda root: folder_splits("imagenet", root),
    open=lambda root, split, limit: _open_folder("imagenet", root, split, limit))
IMAGEFOLDER = DatasetReader(
    name="imagefolder", description="any ROOT/<split>/<class>/<image> tree (jpg, png, bmp, webp, tif, gif)",
    splits=lambda root: folder_splits("imagefolder", root),
    open=lambda root, split, limit: _open_folder("imagefolder", root, split, limit))
