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
                                   pil_to_float_tensor, read_image_size)
from featurestore.errors import UserError
from featurestore.runtime import free_memory, temp_dir_beside

# The store's extensions except .gif, which image sets have never been read from (kept so behaviour is
# unchanged; whether to read .gif here too is a separate decision).
IMAGE_SUFFIXES = IMAGE_EXTENSIONS - {".gif"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._+\- ()\[\],]")

# An image of a set is embedded at a backbone's resolution (a few hundred px); 4096 x 4096 leaves room
# for any real photo while a few-KB PNG declaring 8000 x 8000 is refused from its header.
MAX_SET_IMAGE_PIXELS = 4096 * 4096
# The set is held as float32 at one common size: at most this, and a quarter of the available memory.
MAX_SET_BYTES = 4 << 30


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
    tmp = temp_dir_beside(out_dir)
    counts: dict[int, int] = {}
    relative: list[Path] = []
    try:
        for i, label in enumerate(labels_list):
            # One image at a time: converting the whole set at once held 2 float copies of it (1000 images
            # of 128 px: 375 MB, the peak of a distillation's outputs).
            pixels_i = to_uint8(images[i:i + 1])[0]
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
    """Every entry with an image suffix but folders: a dangling link, a FIFO or a device named x.png is
    listed too, so that reading it fails with a line naming it instead of the set shrinking silently."""
    def order(p: Path):
        # Numeric names in numeric order (2.png before 10.png), others after, by name.
        return (0, int(p.stem), p.name) if p.stem.isdigit() else (1, 0, p.name)

    return sorted((p for p in folder.iterdir() if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".")), key=order)


def _set_bytes_limit() -> int:
    return min(MAX_SET_BYTES, free_memory(torch.device("cpu")) // 4)


def read_imagefolder(directory: str | os.PathLike, class_names: Sequence[str] | None = None,
                     size: int | None = None, max_bytes: int | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """Read `directory/<class folder>/<image>` -> (images float32 [N, 3, H, W] in [0, 1], labels int64 [N],
    class_names).

    class_names given (e.g. the store's): folder `class_folder_names(class_names)[c]` (or the raw class
    name) holds class c; any other folder is an error naming the expected folders. Not given: the sorted
    folder names are the classes. Images keep their pixels when all have one size; if sizes differ (or
    `size` is given), each is made a size x size square the canonical way (shorter side resized, bicubic,
    centre crop), size defaulting to the largest shorter side.

    Bounded before any pixel is decoded (sizes from the headers): an image over MAX_SET_IMAGE_PIXELS,
    or a set whose float32 tensor would exceed `max_bytes` (default: a quarter of the available memory,
    at most MAX_SET_BYTES), is a UserError naming the file. A file that does not decode (a dangling link,
    a device) and an empty class folder are UserErrors too.
    """
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names, index = _class_index(root, folders, class_names)
    files = _listed_images(root, folders, index)
    if files:
        _check_set_memory(files, size, _set_bytes_limit() if max_bytes is None else max_bytes)
    pils = []
    labels = []
    for path, label, _ in files:
        try:
            pils.append(decode_image_file(path, max_pixels=MAX_SET_IMAGE_PIXELS))
        except Exception as exc:  # noqa: BLE001 - CorruptImageError and OS errors alike
            raise UserError(f"cannot read image {path}: {getattr(exc, 'reason', exc)}") from None
        labels.append(label)
    if not pils:
        return torch.zeros(0, 3, size or 1, size or 1), torch.zeros(0, dtype=torch.int64), names
    sizes = {p.size for p in pils}
    if size is None and len(sizes) == 1 and next(iter(sizes))[0] == next(iter(sizes))[1]:
        images = torch.stack([pil_to_float_tensor(p) for p in pils])
    else:
        target = size or max(min(p.size) for p in pils)
        images = torch.stack([canonical_image(p, target) for p in pils])
    return images, torch.tensor(labels, dtype=torch.int64), names


def _class_index(root: Path, folders: list[Path],
                 class_names: Sequence[str] | None) -> tuple[list[str], dict[str, int]]:
    """(class names, folder name -> class): the sorted folders without class_names; with them, a class's
    folder (or its raw name), any other folder a UserError naming the expected folders."""
    if class_names is None:
        return [p.name for p in folders], {p.name: i for i, p in enumerate(folders)}
    names = list(class_names)
    index: dict[str, int] = {}
    for i, (name, folder) in enumerate(zip(names, class_folder_names(names))):
        index[folder] = i
        index.setdefault(name, i)
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        expected = ", ".join(class_folder_names(names)[:12]) + (", ..." if len(names) > 12 else "")
        raise UserError(f"{root}: folder(s) {', '.join(unknown[:5])} are not classes of this dataset "
                        f"(expected folder names: {expected})")
    return names, index


def _listed_images(root: Path, folders: list[Path],
                   index: dict[str, int]) -> list[tuple[Path, int, tuple[int, int]]]:
    """(path, label, (width, height)) of every image, sizes from the headers (no pixel decoded); an empty
    class folder, an unreadable header or an image over MAX_SET_IMAGE_PIXELS is a UserError."""
    files: list[tuple[Path, int, tuple[int, int]]] = []
    for folder in folders:
        listed = _image_files(folder)
        if not listed:
            raise UserError(f"{root}: class folder {folder.name} holds no images: remove it or add its images")
        for path in listed:
            try:
                dims = read_image_size(path)
            except Exception as exc:  # noqa: BLE001 - CorruptImageError and OS errors alike
                raise UserError(f"cannot read image {path}: {getattr(exc, 'reason', exc)}") from None
            if dims[0] * dims[1] > MAX_SET_IMAGE_PIXELS:
                raise UserError(f"{path}: {dims[0]}x{dims[1]} pixels, more than the {MAX_SET_IMAGE_PIXELS} "
                                f"(4096x4096) an image of a set may have: resize it")
            files.append((path, index[folder.name], dims))
    return files


def _check_set_memory(files: list[tuple[Path, int, tuple[int, int]]], size: int | None, max_bytes: int) -> None:
    """The set as read_imagefolder will hold it (float32, one common size) must fit in max_bytes; the
    line names the file that sets the size."""
    dims = {d for _, _, d in files}
    if size is None and len(dims) == 1 and next(iter(dims))[0] == next(iter(dims))[1]:
        side, culprit = next(iter(dims))[0], files[0]
    else:
        culprit = max(files, key=lambda f: min(f[2]))
        side = size or min(culprit[2])
    need = len(files) * 3 * side * side * 4
    if need > max_bytes:
        path, _, (width, height) = culprit
        raise UserError(f"{path} ({width}x{height}) would hold the set's {len(files)} images at {side}x{side} px: "
                        f"{need / 2**30:.2f} GiB, more than the {max_bytes / 2**30:.2f} GiB a set may take (a "
                        f"quarter of the available memory, at most {MAX_SET_BYTES >> 30} GiB): resize it to the "
                        f"size of the set's other images")
