"""Image sets on disk in the ImageFolder layout: `<dir>/<class folder>/<k>.png`.

Distilled sets, baselines and users' own sets all use it, so any trainer (torchvision ImageFolder,
timm, ...) reads them, and `engine eval` treats every set alike.

Class folders are named `class_folder_name(class_name)`: the class name with characters that are
unsafe in file names (path separators, control and shell-hostile characters) replaced by '_', so
"t-shirt/top" becomes "t-shirt_top". `class_folder_names` makes the names of a whole class list
unique (a name that collides after sanitizing gets "-<index>" appended), and `read_imagefolder`
maps folders back to class indices through the same function.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from featurestore.datasets import (IMAGE_EXTENSIONS, canonical_image, decode_image_file,
                                   pil_to_float_tensor)
from featurestore.errors import UserError
from featurestore.runtime import temp_dir_beside

# The store's extensions except .gif, which image sets have never been read from (kept so behaviour is
# unchanged; whether to read .gif here too is a separate decision).
IMAGE_SUFFIXES = IMAGE_EXTENSIONS - {".gif"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._+\- ()\[\],]")


# File systems refuse names over 255 bytes; a class name can be longer (ImageNet-21k glosses, captions used as
# labels). Longer names are cut and given a hash of the full name, so they stay distinct and stable; the
# full names are kept in the run's metadata (config.json, baseline.json, distilled.safetensors).
MAX_FOLDER_CHARS = 100


def class_folder_name(name: str) -> str:
    """A file-system-safe folder name for a class name (stable: the same name always maps the same)."""
    safe = _UNSAFE.sub("_", name).strip(" .") or "_"
    if len(safe) > MAX_FOLDER_CHARS:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        safe = f"{safe[:MAX_FOLDER_CHARS - 9].rstrip(' .')}~{digest}"
    return safe


def class_folder_names(class_names: Sequence[str]) -> list[str]:
    """Folder names of a class list, unique (case-insensitively, for macOS/Windows file systems)."""
    folders: list[str] = []
    seen: set[str] = set()
    for index, name in enumerate(class_names):
        folder = class_folder_name(name)
        if folder.lower() in seen:
            folder = f"{folder}-{index}"
        seen.add(folder.lower())
        folders.append(folder)
    return folders


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, 3, H, W] float in [0, 1] -> uint8 [N, H, W, 3] (rounded, as torchvision's save_image)."""
    array = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image_hwc: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_hwc).save(buffer, format="PNG")
    return buffer.getvalue()


def write_imagefolder(out_dir: str | os.PathLike, images: Tensor, labels: Tensor | Sequence[int],
                      class_names: Sequence[str]) -> list[Path]:
    """Write images [N, 3, H, W] in [0, 1] as `out_dir/<class folder>/<k>.png`, k = 0.. within a class.

    The directory is written next to its final place and renamed into it, so a reader never sees a half
    set; an existing `out_dir` is replaced. Returns the PNG paths in input order.
    """
    out_dir = Path(out_dir)
    labels_list = [int(v) for v in (labels.tolist() if isinstance(labels, Tensor) else labels)]
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(labels_list):
        raise ValueError(f"expected images [N, 3, H, W] and N labels, got {tuple(images.shape)} and "
                         f"{len(labels_list)} labels")
    if any(not 0 <= v < len(class_names) for v in labels_list):
        raise ValueError(f"labels must be in [0, {len(class_names)})")
    folders = class_folder_names(class_names)
    pixels = to_uint8(images)
    tmp = temp_dir_beside(out_dir)
    counts: dict[int, int] = {}
    relative: list[Path] = []
    try:
        for pixels_i, label in zip(pixels, labels_list):
            k = counts.get(label, 0)
            counts[label] = k + 1
            rel = Path(folders[label]) / f"{k}.png"
            (tmp / rel.parent).mkdir(exist_ok=True)
            (tmp / rel).write_bytes(png_bytes(pixels_i))
            relative.append(rel)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / rel for rel in relative]


def _image_files(folder: Path) -> list[Path]:
    def order(p: Path):
        # Numeric names in numeric order (2.png before 10.png), others after, by name.
        return (0, int(p.stem), p.name) if p.stem.isdigit() else (1, 0, p.name)

    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".")), key=order)


def read_imagefolder(directory: str | os.PathLike, class_names: Sequence[str] | None = None,
                     size: int | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """Read `directory/<class folder>/<image>` -> (images float32 [N, 3, H, W] in [0, 1], labels int64 [N],
    class_names).

    class_names given (e.g. the store's): folder `class_folder_names(class_names)[c]` (or the raw class
    name) holds class c; any other folder is an error naming the expected folders. Not given: the sorted
    folder names are the classes. Images keep their pixels when all have one size; if sizes differ (or
    `size` is given), each is made a size x size square the canonical way (shorter side resized, bicubic,
    centre crop), size defaulting to the largest shorter side.
    """
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        names = [p.name for p in folders]
        index = {p.name: i for i, p in enumerate(folders)}
    else:
        names = list(class_names)
        index = {}
        for i, (name, folder) in enumerate(zip(names, class_folder_names(names))):
            index[folder] = i
            index.setdefault(name, i)
        unknown = [p.name for p in folders if p.name not in index]
        if unknown:
            expected = ", ".join(class_folder_names(names)[:12]) + (", ..." if len(names) > 12 else "")
            raise UserError(f"{root}: folder(s) {', '.join(unknown[:5])} are not classes of this dataset "
                            f"(expected folder names: {expected})")
    pils = []
    labels = []
    for folder in folders:
        for path in _image_files(folder):
            try:
                pils.append(decode_image_file(path))
            except Exception as exc:  # noqa: BLE001 - CorruptImageError and OS errors alike
                raise UserError(f"cannot read image {path}: {getattr(exc, 'reason', exc)}") from None
            labels.append(index[folder.name])
    if not pils:
        return torch.zeros(0, 3, size or 1, size or 1), torch.zeros(0, dtype=torch.int64), names
    sizes = {p.size for p in pils}
    if size is None and len(sizes) == 1 and next(iter(sizes))[0] == next(iter(sizes))[1]:
        images = torch.stack([pil_to_float_tensor(p) for p in pils])
    else:
        target = size or max(min(p.size) for p in pils)
        images = torch.stack([canonical_image(p, target) for p in pils])
    return images, torch.tensor(labels, dtype=torch.int64), names
