"""Labelled image datasets the feature store reads: ImageNet and generic ImageFolder trees, Fashion-MNIST
(IDX files), and a procedural `synthetic` set that needs no files.

Every dataset is an `ImageDataset` (a torch `Dataset`) with the same attributes: `name`, `root`, `split`,
`class_names`, `labels` (int64 [N]), `sample_ids` (one string per sample that finds it again: the path
relative to `root` for files, `"<index>"` into the original split for array datasets), `empty_classes`,
and `load_image(i) -> PIL.Image` in RGB.

Split names are `train` and `val` for every dataset, so callers can always ask for those two. For
Fashion-MNIST, `val` is the official 10k test set (the `t10k-*` IDX files).

Decoding policy (the same for every file-backed dataset, and the reason for each choice):
- Files are listed by extension (.jpg .jpeg .png .bmp .webp .tif .tiff .gif, any case); other files and
  hidden entries (names starting with ".", e.g. macOS `._x.jpg` resource forks and `.DS_Store`) are
  ignored while listing. A file with an image extension that does not decode raises `CorruptImageError`
  when loaded, so a writer can count and list it instead of silently dropping it.
- Pixels are decoded eagerly (`Image.load()`), and PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` is left at
  False, so truncated JPEG/PNG files are errors rather than grey-padded images.
- Grey, palette, CMYK, YCbCr and bilevel images go through PIL's `convert("RGB")` (what torchvision's
  ImageFolder loader does, so features match reference pipelines).
- Images with an alpha channel (RGBA, LA, PA, palette/grey/RGB with a transparency key) are composited
  onto white: the colour stored under fully transparent pixels is arbitrary (often black), and white is
  how such images are displayed. Dropping alpha instead would differ only for transparent images.
- 16-bit (and 32-bit integer) grey images are scaled from [0, 65535] to [0, 255] (v / 257, rounded);
  PIL's own conversion would clip everything above 255 to white. Float ("F") images are taken as [0, 1].
- EXIF orientation is not applied, as in torchvision's ImageFolder, so features match reference code.

`canonical_image` is the store's image transform (ARCHITECTURE.md "the canonical real image").
"""

from __future__ import annotations

import colorsys
import copy
import gzip
import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from featurestore.errors import DatasetError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
SPLITS: tuple[str, str] = ("train", "val")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Split name -> IDX file prefix of the Debian package dataset-fashion-mnist.
_FASHION_MNIST_PREFIX = {"train": "train", "val": "t10k"}
_IMAGENET_SYNSET_FILE = "LOC_synset_mapping.txt"


class CorruptImageError(Exception):
    """A file with an image extension that cannot be decoded (truncated, corrupt, not an image).

    `reason` is a short human-readable string; writers record it next to the sample id.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------
# Decoding and the canonical image


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip() or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any common mode to 8-bit RGB (policy in the module docstring)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def decode_image_file(path: str | os.PathLike) -> Image.Image:
    """Read and fully decode an image file to RGB; any failure raises `CorruptImageError(reason)`."""
    try:
        # Reading the bytes first keeps no file handle open after decoding (PIL keeps multi-frame
        # files such as GIF/TIFF open lazily), which matters with thousands of files per worker.
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CorruptImageError(f"unreadable file: {_short(exc)}") from None
    if not data:
        raise CorruptImageError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise CorruptImageError("not an image (PIL cannot identify the format)") from None
    except Image.DecompressionBombError as exc:
        raise CorruptImageError(f"image too large to decode safely: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on an untrusted file means "broken file"
        raise CorruptImageError(f"corrupt or truncated image header: {_short(exc)}") from None
    try:
        image.load()  # forces the full decode: truncated data raises here
    except Exception as exc:  # noqa: BLE001
        raise CorruptImageError(f"truncated or corrupt {image.format or 'image'}: {_short(exc)}") from None
    try:
        return to_rgb(image)
    except Exception as exc:  # noqa: BLE001
        raise CorruptImageError(f"cannot convert {image.mode} image to RGB: {_short(exc)}") from None


def canonical_image(image: Image.Image, resize_size: int) -> torch.Tensor:
    """The canonical real image: float32 [3, R, R] in [0, 1], R = `resize_size`.

    Shorter side resized to R with bicubic antialiased interpolation, then the centre R x R crop.
    Implemented with torchvision.transforms.v2.functional on the PIL image, which dispatches to PIL's
    resize (bicubic with an antialiasing support window) and rounds to uint8 before scaling to [0, 1]:
    byte-for-byte the `Resize(R, BICUBIC) + CenterCrop(R) + ToTensor()` eval transform that DINOv2,
    timm and the LGM code apply to PIL images, so stored features match those pipelines.
    """
    if resize_size <= 0:
        raise ValueError(f"resize_size must be positive, got {resize_size}")
    if image.mode != "RGB":
        image = to_rgb(image)
    resized = TF.resize(image, [resize_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    cropped = TF.center_crop(resized, [resize_size, resize_size])
    return pil_to_float_tensor(cropped)


def describe_canonical(resize_size: int) -> str:
    """One line for store attributes: how real images were turned into canonical tensors."""
    return (f"RGB (alpha composited on white, 16-bit scaled), shorter side resized to {resize_size} "
            f"(PIL bicubic, antialiased), centre crop {resize_size}x{resize_size}, float32 in [0, 1]")


@dataclass(frozen=True)
class CanonicalTransform:
    """Picklable `canonical_image` with a fixed size, for `ImageDataset.with_transform`."""

    resize_size: int

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return canonical_image(image, self.resize_size)


def pil_to_float_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1] (the default transform: no resizing).

    Divides by 255 as torchvision's ToTensor does (v2's to_dtype multiplies by 1/255, which differs
    in the last bit), so tensors are bit-identical to the classic eval pipeline's.
    """
    return TF.pil_to_tensor(image).to(torch.float32).div_(255)


# ----------------------------------------------------------------------------------------------------
# ImageDataset


class ImageBatch(NamedTuple):
    """What `collate_image_batch` returns for one DataLoader batch.

    `indices` (int64 [B_ok]) and `images` ([B_ok, ...]) are the samples that decoded, in batch order;
    `failed` lists `(index, reason)` for the ones that did not. When nothing decoded, `images` is
    `torch.empty(0)`.
    """

    indices: torch.Tensor
    images: torch.Tensor
    failed: list[tuple[int, str]]


def collate_image_batch(samples: Sequence[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch:
    """DataLoader `collate_fn` for `ImageDataset.__getitem__` items: stacks the good ones, lists the rest."""
    good = [(index, tensor) for index, tensor, _ in samples if tensor is not None]
    failed = [(int(index), str(reason)) for index, tensor, reason in samples if tensor is None]
    indices = torch.tensor([index for index, _ in good], dtype=torch.int64)
    images = torch.stack([tensor for _, tensor in good]) if good else torch.empty(0)
    return ImageBatch(indices=indices, images=images, failed=failed)


class ImageDataset(Dataset):
    """A labelled split of an image dataset. Subclasses implement `_load(i) -> RGB PIL image`.

    `__getitem__(i)` returns `(i, tensor, None)` or `(i, None, reason)` for a broken file, so DataLoader
    workers decode and preprocess without a corrupt file stopping the loader; combine with
    `collate_fn=collate_image_batch`. The tensor comes from the transform given to the constructor or
    `with_transform` (default `pil_to_float_tensor`; the store uses `CanonicalTransform(resize_size)`).
    Instances are picklable (for worker processes) as long as the transform is.
    """

    def __init__(self, *, name: str, root: str | None, split: str, class_names: Sequence[str],
                 labels: np.ndarray, sample_ids: Sequence[str], limit_per_class: int | None = None,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        self.name = name
        self.root = root
        self.split = split
        self.class_names: list[str] = list(class_names)
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)
        self.sample_ids: list[str] = list(sample_ids)
        self.limit_per_class = limit_per_class
        self.transform = transform
        if len(self.labels) != len(self.sample_ids):
            raise ValueError("labels and sample_ids must have the same length")

    # --- what every dataset shares
    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """Samples per class, int64 [C] (a class can have 0: see `empty_classes`)."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    @property
    def empty_classes(self) -> list[str]:
        """Names of classes with no samples in this split (kept so class indices stay stable)."""
        counts = self.class_counts()
        return [name for name, count in zip(self.class_names, counts) if count == 0]

    def open_args(self) -> dict:
        """Arguments that reopen this exact dataset: `open_dataset(**ds.open_args())`."""
        return {"name": self.name, "root": self.root, "split": self.split,
                "limit_per_class": self.limit_per_class}

    def describe(self) -> dict:
        """JSON-able summary for store attributes and `fs datasets`."""
        return {**self.open_args(), "num_samples": len(self), "num_classes": self.num_classes,
                "class_names": list(self.class_names), "empty_classes": self.empty_classes}

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample index {index} out of range for {n} samples")
        return index % n if n else index

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample `index`; raises `CorruptImageError` for a broken file."""
        return self._load(self._check_index(int(index)))

    def _load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def with_transform(self, transform: Callable[[Image.Image], torch.Tensor] | None) -> "ImageDataset":
        """A shallow copy whose `__getitem__` applies `transform` (must be picklable for workers)."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        index = int(index)
        transform = self.transform or pil_to_float_tensor
        try:
            return index, transform(self.load_image(index)), None
        except CorruptImageError as exc:
            return index, None, exc.reason

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, root={self.root!r}, split={self.split!r}, "
                f"n={len(self)}, classes={self.num_classes})")


class FolderImageDataset(ImageDataset):
    """Images in `root/<split>/<class>/...` (sub-folders inside a class folder are included).

    Files are found again as `root/sample_id` (sample ids are POSIX paths relative to root), so no
    second list of absolute paths is held or pickled to workers.
    """

    def path(self, index: int) -> str:
        """Absolute path of sample `index`."""
        return os.path.join(self.root, self.sample_ids[self._check_index(int(index))])

    def _load(self, index: int) -> Image.Image:
        return decode_image_file(os.path.join(self.root, self.sample_ids[index]))


class ArrayImageDataset(ImageDataset):
    """Images held in memory as uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB) arrays."""

    def __init__(self, *, images: np.ndarray, **kwargs) -> None:
        super().__init__(**kwargs)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(self.labels):
            raise ValueError("images must be uint8 [N, H, W] or [N, H, W, 3] aligned with labels")
        self._images = images

    def _load(self, index: int) -> Image.Image:
        return Image.fromarray(self._images[index]).convert("RGB")


# ----------------------------------------------------------------------------------------------------
# synthetic: procedural class-conditional images


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the `synthetic` dataset. Class c is an oriented grating patch: orientation
    `c % 5` (of 5, 36 degrees apart) and colour family `c // 5` (warm or cool), so neither colour nor
    orientation alone separates the classes. Every sample jitters orientation, spatial frequency, phase,
    patch position/size, colours and contrast, adds a random-colour distractor blob and pixel noise,
    all seeded by (seed, split, index): the same sample is the same image on every machine."""

    num_classes: int = 10
    per_class: tuple[tuple[str, int], ...] = (("train", 200), ("val", 50))
    image_size: int = 64
    seed: int = 0
    orientation_jitter_deg: float = 9.0
    noise_std: float = 0.06

    def count(self, split: str) -> int:
        return dict(self.per_class)[split]


_SYNTHETIC_ORIENTATIONS = 5
_SYNTHETIC_FAMILIES = ("warm", "cool")
# Hue ranges (HSV, in turns) of the two colour families.
_SYNTHETIC_HUES = {"warm": (0.95, 1.12), "cool": (0.45, 0.70)}


def synthetic_class_names(num_classes: int) -> list[str]:
    names = []
    for c in range(num_classes):
        angle = (c % _SYNTHETIC_ORIENTATIONS) * 180 // _SYNTHETIC_ORIENTATIONS
        family = _SYNTHETIC_FAMILIES[(c // _SYNTHETIC_ORIENTATIONS) % len(_SYNTHETIC_FAMILIES)]
        names.append(f"grating-{angle:03d}deg-{family}")
    return names


def render_synthetic(label: int, split: str, index: int, config: SyntheticConfig = SyntheticConfig()) -> np.ndarray:
    """The synthetic image of sample `index` of `split` (with class `label`): uint8 [S, S, 3]."""
    split_code = {"train": 0, "val": 1}.get(split)
    if split_code is None:
        split_code = int.from_bytes(split.encode()[:8].ljust(8, b"\0"), "little")
    rng = np.random.default_rng([config.seed, split_code, index, label])
    size = config.image_size
    orientation_step = math.pi / _SYNTHETIC_ORIENTATIONS
    # Classes beyond 2 * 5 repeat the pattern grid with a shifted orientation so they stay distinct.
    cycle = label // (_SYNTHETIC_ORIENTATIONS * len(_SYNTHETIC_FAMILIES))
    theta = ((label % _SYNTHETIC_ORIENTATIONS) + 0.5 * (cycle % 2)) * orientation_step
    theta += math.radians(rng.normal(0.0, config.orientation_jitter_deg))
    family = _SYNTHETIC_FAMILIES[(label // _SYNTHETIC_ORIENTATIONS) % len(_SYNTHETIC_FAMILIES)]

    coords = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres in (0, 1)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    frequency = rng.uniform(3.0, 6.0)  # cycles per image width
    phase = rng.uniform(0.0, 2 * math.pi)
    grating = 0.5 + 0.5 * np.sin(2 * math.pi * frequency * (x * math.cos(theta) + y * math.sin(theta)) + phase)

    def colour(hue_range: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
        hue = rng.uniform(*hue_range) % 1.0
        return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*sat), rng.uniform(*val)))

    background = rng.uniform(0.2, 0.8, size=3)
    stripe = colour(_SYNTHETIC_HUES[family], (0.55, 1.0), (0.6, 1.0))
    contrast = rng.uniform(0.5, 1.0)
    # A soft disk holds the grating; outside it the background shows.
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    radius = rng.uniform(0.28, 0.45)
    disk = 1.0 / (1.0 + np.exp(((np.hypot(x - cx, y - cy) - radius) / 0.02)))
    mix = (contrast * grating * disk)[..., None]
    image = background * (1 - mix) + stripe * mix
    # Distractor: a Gaussian blob of a random colour, unrelated to the class.
    bx, by = rng.uniform(0.0, 1.0, size=2)
    sigma = rng.uniform(0.05, 0.15)
    blob = (rng.uniform(0.3, 0.8) * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * sigma ** 2)))[..., None]
    image = image * (1 - blob) + rng.uniform(0.0, 1.0, size=3) * blob
    image = image + rng.normal(0.0, config.noise_std, size=image.shape)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


class SyntheticImageDataset(ImageDataset):
    """Procedural images (see `SyntheticConfig`); samples are ordered class by class."""

    def __init__(self, *, config: SyntheticConfig, split: str, limit_per_class: int | None = None,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        per_class = config.count(split)
        keep = per_class if limit_per_class is None else min(per_class, limit_per_class)
        labels = np.repeat(np.arange(config.num_classes, dtype=np.int64), keep)
        original = (labels * per_class + np.tile(np.arange(keep), config.num_classes)).astype(np.int64)
        super().__init__(name="synthetic", root=None, split=split,
                         class_names=synthetic_class_names(config.num_classes), labels=labels,
                         sample_ids=[str(i) for i in original], limit_per_class=limit_per_class,
                         transform=transform)
        self.config = config
        self._original = original

    def _load(self, index: int) -> Image.Image:
        pixels = render_synthetic(int(self.labels[index]), self.split, int(self._original[index]), self.config)
        return Image.fromarray(pixels)


# ----------------------------------------------------------------------------------------------------
# Folder datasets (imagenet, imagefolder)


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
        raise DatasetError(f"cannot read {path}: {_short(exc)} (fix or remove the file)") from None
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


def _open_folder(name: str, root: str | os.PathLike | None, split: str, limit_per_class: int | None,
                 transform: Callable | None) -> FolderImageDataset:
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
                              limit_per_class=limit_per_class, transform=transform)


# ----------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip-compressed if the name ends in .gz) into a native-endian numpy array.

    Format: 2 zero bytes, a dtype code, the number of dimensions n, n big-endian uint32 sizes, then the
    data in C order. Anything else (bad magic, wrong length) raises DatasetError.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {_short(exc)} (reinstall or re-download it)") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number): reinstall or re-download it")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated (incomplete IDX header): reinstall or re-download it")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path} holds {len(data) - header} data bytes but its header {tuple(shape)} "
                           f"needs {expected}: reinstall or re-download it")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _fashion_mnist_files(root: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _FASHION_MNIST_PREFIX[split]
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


def _fashion_mnist_root(root: str | os.PathLike | None) -> Path:
    path = Path(root if root is not None else FASHION_MNIST_ROOT).expanduser()
    if not path.is_dir():
        raise DatasetError(f"Fashion-MNIST not found at {path}: install it with "
                           f"`sudo apt-get install dataset-fashion-mnist` or pass --data-root")
    return path.resolve()


def _open_fashion_mnist(root: str | os.PathLike | None, split: str, limit_per_class: int | None,
                        transform: Callable | None) -> ArrayImageDataset:
    # The split name is checked first: a wrong name is wrong whether or not the files are installed.
    if split not in _FASHION_MNIST_PREFIX:
        raise DatasetError(f"fashion-mnist has splits train and val (val is the official t10k test set), "
                           f"not {split!r}")
    root_path = _fashion_mnist_root(root)
    files = _fashion_mnist_files(root_path, split)
    if files is None:
        prefix = _FASHION_MNIST_PREFIX[split]
        raise DatasetError(f"Fashion-MNIST not found at {root_path} (no {prefix}-images-idx3-ubyte.gz / "
                           f"{prefix}-labels-idx1-ubyte.gz): install it with "
                           f"`sudo apt-get install dataset-fashion-mnist` or pass --data-root")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{files[0]} and {files[1]} do not form an image/label pair "
                           f"(shapes {images.shape}, {labels.shape}): reinstall the dataset")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise DatasetError(f"{files[1]} has labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}: reinstall it")
    if len(labels) == 0:
        raise DatasetError(f"{files[0]} holds no images: reinstall the dataset")
    indices = np.arange(len(labels))
    if limit_per_class is not None:
        indices = _first_per_class(labels, limit_per_class)
    return ArrayImageDataset(name="fashion-mnist", root=str(root_path), split=split,
                             class_names=FASHION_MNIST_CLASSES, labels=labels[indices],
                             sample_ids=[str(i) for i in indices], limit_per_class=limit_per_class,
                             transform=transform, images=np.ascontiguousarray(images[indices]))


def _first_per_class(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices (ascending) of the first `limit` samples of every class, in index order."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts  # position of each sample within its class
    return np.sort(order[rank < limit])


# ----------------------------------------------------------------------------------------------------
# Registry


_DATASETS: dict[str, str] = {
    "imagenet": "ImageNet in ImageFolder layout: ROOT/train/<wnid>/*, ROOT/val/<wnid>/*; class names from "
                "ROOT/LOC_synset_mapping.txt when present",
    "imagefolder": "any ROOT/<split>/<class>/<image> tree (jpg, png, bmp, webp, tif, gif)",
    "fashion-mnist": f"Fashion-MNIST IDX files (Debian package dataset-fashion-mnist, default "
                     f"{FASHION_MNIST_ROOT}); 60k train / 10k val (= t10k test), 28x28 grey -> RGB",
    "synthetic": "procedural class-conditional gratings, 10 classes, 64x64, 200 train / 50 val per class; "
                 "no files needed",
}


def list_datasets() -> list[tuple[str, str]]:
    """(name, one-line description) of every dataset `open_dataset` knows."""
    return list(_DATASETS.items())


def _check_name(name: str) -> None:
    if name not in _DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: known datasets are {', '.join(_DATASETS)}")


def dataset_splits(name: str, root: str | os.PathLike | None = None) -> list[str]:
    """Splits present for dataset `name` at `root` (train and val first)."""
    _check_name(name)
    if name == "synthetic":
        _check_no_root(root)
        return [split for split, _ in SyntheticConfig().per_class]
    if name == "fashion-mnist":
        root_path = _fashion_mnist_root(root)
        splits = [s for s in _FASHION_MNIST_PREFIX if _fashion_mnist_files(root_path, s) is not None]
        if not splits:
            raise DatasetError(f"Fashion-MNIST not found at {root_path} (no IDX files): install it with "
                               f"`sudo apt-get install dataset-fashion-mnist` or pass --data-root")
        return splits
    root_path = _resolve_root(name, root)
    splits = _folder_splits(root_path)
    if not splits:
        raise DatasetError(f"{root_path} has no <split>/<class>/ folders: expected e.g. "
                           f"{root_path}/train/<class>/<image>")
    return splits


def _check_no_root(root: str | os.PathLike | None) -> None:
    if root is not None:
        raise DatasetError(f"the synthetic dataset is generated, it reads no files: drop --data-root ({root})")


def open_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                 limit_per_class: int | None = None,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None) -> ImageDataset:
    """Open one split of a dataset. `limit_per_class=N` keeps the first N samples of each class (sorted
    file order, or index order for array datasets). Bad input raises DatasetError with one line."""
    _check_name(name)
    if limit_per_class is not None:
        if isinstance(limit_per_class, bool) or int(limit_per_class) != limit_per_class or limit_per_class <= 0:
            raise DatasetError(f"--limit-per-class must be a positive integer, got {limit_per_class}")
        limit_per_class = int(limit_per_class)
    if name == "synthetic":
        _check_no_root(root)
        config = SyntheticConfig()
        if split not in dict(config.per_class):
            raise DatasetError(f"synthetic has splits {', '.join(s for s, _ in config.per_class)}, not {split!r}")
        return SyntheticImageDataset(config=config, split=split, limit_per_class=limit_per_class,
                                     transform=transform)
    if name == "fashion-mnist":
        return _open_fashion_mnist(root, split, limit_per_class, transform)
    return _open_folder(name, root, split, limit_per_class, transform)
