"""Datasets of image files in class folders: `imagefolder` (any ROOT/<split>/<class>/<image> tree) and
`imagenet` (the same layout, class names from ROOT/LOC_synset_mapping.txt when present)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featurestore.errors import DatasetError, one_line

from .base import SPLITS, DatasetReader, FolderImageDataset
from .decode import IMAGE_EXTENSIONS

_IMAGENET_SYNSET_FILE = "LOC_synset_mapping.txt"


def _is_zarr_store(path: str | os.PathLike) -> bool:
    """A folder holding a zarr.json is a Zarr node (e.g. a feature store written inside the dataset root):
    never a split, a class, or a folder of images."""
    return os.path.isfile(os.path.join(path, "zarr.json"))


def _visible_dirs(path: Path, stores: list[str] | None = None) -> list[str]:
    """Names of the visible sub-folders of `path`, Zarr stores excluded (their paths are appended to
    `stores` when given, so the caller can say it skipped them)."""
    names = []
    with os.scandir(path) as entries:
        for e in entries:
            if e.name.startswith(".") or not e.is_dir():
                continue
            if _is_zarr_store(e.path):
                if stores is not None:
                    stores.append(e.path)
                continue
            names.append(e.name)
    return sorted(names)


class _SplitListing:
    """Lists the image files of one split's class folders, following symlinks but reading every real
    folder and every real file once: a link loop (`train/c/again -> .`) would otherwise list the same
    images once per level until the OS refuses the path, and a file reachable by several paths would be
    stored several times. What was left out is counted for one warning line (`warnings()`)."""

    def __init__(self, split: str, class_dirs: list[str]) -> None:
        self.split = split
        # Every class folder is registered first, so a link from class a to class b's folder is a
        # duplicate, not a second copy of b's images labelled a.
        self.dirs_seen: set[str] = {os.path.realpath(d) for d in class_dirs}
        self.files_seen: set[str] = set()
        self.duplicate_dirs: list[str] = []  # display paths of folder links left out
        self.duplicate_files: list[str] = []  # sample ids left out
        self.stores: list[str] = []

    def images(self, class_dir: str, prefix: str) -> list[str]:
        """`prefix + relative path` of the image files under `class_dir` (recursively), sorted. Plain
        strings rather than Path objects: ImageNet's train split has 1.28M files."""
        found: list[str] = []
        stack = [(class_dir, os.path.realpath(class_dir), prefix)]
        while stack:
            path, real, base = stack.pop()
            try:
                with os.scandir(path) as it:
                    # Plain entries before links: of two paths to one file, the real one is kept.
                    entries = sorted((e for e in it if not e.name.startswith(".")),
                                     key=lambda e: (e.is_symlink(), e.name))
            except OSError:  # unreadable folder: skipped, as os.walk does
                continue
            subdirs = []
            for entry in entries:
                try:
                    is_dir = entry.is_dir()  # follows links; a dangling link is no folder
                    # Only links need a realpath call (a syscall per component); a plain entry's real
                    # path is its real parent's plus its name.
                    entry_real = os.path.realpath(entry.path) if entry.is_symlink() else f"{real}/{entry.name}"
                except OSError:
                    continue
                if is_dir:
                    if _is_zarr_store(entry.path):
                        self.stores.append(entry.path)
                    elif entry_real in self.dirs_seen:
                        self.duplicate_dirs.append(base + entry.name)
                    else:
                        self.dirs_seen.add(entry_real)
                        subdirs.append((entry.path, entry_real, base + entry.name + "/"))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    # Non-regular files (FIFOs, devices) are listed too: decoding refuses them, and the
                    # store lists them as skipped like any other broken file.
                    if entry_real in self.files_seen:
                        self.duplicate_files.append(base + entry.name)
                    else:
                        self.files_seen.add(entry_real)
                        found.append(base + entry.name)
            stack.extend(reversed(subdirs))
        found.sort()
        return found

    def warnings(self) -> list[str]:
        out = []
        if self.duplicate_dirs or self.duplicate_files:
            parts = []
            if self.duplicate_dirs:
                parts.append(f"{len(self.duplicate_dirs)} folder link(s) to folders already listed "
                             f"(e.g. {self.duplicate_dirs[0]})")
            if self.duplicate_files:
                parts.append(f"{len(self.duplicate_files)} path(s) to image files already listed "
                             f"(e.g. {self.duplicate_files[0]})")
            out.append(f"split {self.split}: left out {' and '.join(parts)}; every image is read once")
        return out


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


def _folder_splits(root: Path, stores: list[str] | None = None) -> list[str]:
    """Sub-folders of root that hold at least one class sub-folder; train/val first. Zarr stores are
    not splits (appended to `stores` when given)."""
    splits = [d for d in _visible_dirs(root, stores) if _visible_dirs(root / d)]
    return sorted(splits, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))


def _read_synset_mapping(path: Path) -> dict[str, str]:
    """`n01440764 tench, Tinca tinca` lines -> {wnid: first name}."""
    mapping: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {one_line(exc, with_type=False)} (fix or remove the file)") from None
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
    stores: list[str] = []
    splits = _folder_splits(root_path, stores)
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
    wnids = sorted({c for s in splits for c in _visible_dirs(root_path / s, stores if s == split else None)})
    class_names = _imagenet_class_names(root_path, wnids) if name == "imagenet" else list(wnids)
    sample_ids: list[str] = []
    labels: list[int] = []
    class_dirs = [str(split_dir / c) for c in wnids if (split_dir / c).is_dir()]
    listing = _SplitListing(split, class_dirs)
    for label, class_dir_name in enumerate(wnids):
        class_dir = split_dir / class_dir_name
        files = listing.images(str(class_dir), f"{split}/{class_dir_name}/") if class_dir.is_dir() else []
        if limit_per_class is not None:
            files = files[:limit_per_class]
        sample_ids += files
        labels += [label] * len(files)
    if not sample_ids:
        raise DatasetError(f"no images found in {split_dir}: expected {split}/<class>/<image> files with "
                           f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))}")
    notes = listing.warnings()
    stores += listing.stores
    if stores:
        shown = ", ".join(os.path.relpath(p, root_path) for p in sorted(set(stores)))
        notes.append(f"skipped {shown} under dataset root {root_path}: Zarr stores (a feature store?) are "
                     f"not image folders; keep stores outside the dataset root")
    return FolderImageDataset(name=name, root=str(root_path), split=split, class_names=class_names,
                              labels=np.array(labels, dtype=np.int64), sample_ids=sample_ids,
                              limit_per_class=limit_per_class, warnings=notes)


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
