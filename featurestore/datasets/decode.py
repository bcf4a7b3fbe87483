"""Decoding image files to RGB and the canonical real image, shared by every dataset.

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

import io
import os
import stat
import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from featurestore.errors import one_line

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


class CorruptImageError(Exception):
    """A file with an image extension that cannot be decoded (truncated, corrupt, not an image).

    `reason` is a short human-readable string; writers record it next to the sample id.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


# Largest image file read (bytes). The biggest legitimate dataset images (TIFF scans, 100 MP JPEGs) stay
# well below it; anything larger is almost surely not an image (a disk image, /dev/zero behind a link)
# and reading it whole would exhaust a DataLoader worker's memory.
MAX_IMAGE_FILE_BYTES = 256 * 1024 * 1024

_FILE_KINDS = ((stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
               (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"))


def _read_regular_file(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes, else CorruptImageError.
    Checked with stat before opening: opening a FIFO blocks forever, reading /dev/zero never ends."""
    _check_regular_file(path, limit)
    try:
        # Reading the bytes first keeps no file handle open after decoding (PIL keeps multi-frame
        # files such as GIF/TIFF open lazily), which matters with thousands of files per worker.
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)  # bounded even if the file grew since the stat
    except OSError as exc:
        raise CorruptImageError(f"unreadable file: {one_line(exc, with_type=False)}") from None
    if len(data) > limit:
        raise CorruptImageError(f"file too large (more than the {limit >> 20} MiB read per image)")
    return data


def _check_regular_file(path: str | os.PathLike, limit: int) -> None:
    """CorruptImageError unless `path` is a regular file of at most `limit` bytes (stat only)."""
    try:
        info = os.stat(path)  # follows symlinks: the kind of what a link points to is what matters
    except OSError as exc:
        raise CorruptImageError(f"unreadable file: {one_line(exc, with_type=False)}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "special file")
        raise CorruptImageError(f"not a regular file ({kind})")
    if info.st_size > limit:
        raise CorruptImageError(f"file too large ({info.st_size} bytes, more than the {limit >> 20} MiB "
                                f"read per image)")


# Largest image decoded (pixels), checked from the header before any pixel is decoded: PIL's own
# decompression-bomb threshold (~89 MP, 0.25 GiB as RGB), which PIL itself only warns about below twice
# that. A few-KB PNG can declare 8000x8000 or more; decoding it would take that memory in each worker.
MAX_DECODE_PIXELS = 89_478_485


def _open_header(data_or_path: "bytes | str | os.PathLike") -> Image.Image:
    """PIL's lazy open: reads the header only (format, mode, size); CorruptImageError if unreadable."""
    try:
        with warnings.catch_warnings():  # the pixel bound is ours (_check_pixels): no second word from PIL
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path)
    except Image.UnidentifiedImageError:
        raise CorruptImageError("not an image (PIL cannot identify the format)") from None
    except Image.DecompressionBombError as exc:
        raise CorruptImageError(f"image too large to decode safely: {one_line(exc, with_type=False)}") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on an untrusted file means "broken file"
        raise CorruptImageError(f"corrupt or truncated image header: {one_line(exc, with_type=False)}") from None


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise CorruptImageError(f"{width}x{height} pixels, more than the {max_pixels} decoded per image")


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding its pixels. The same checks
    as `decode_image_file` before the open (regular file, size cap); CorruptImageError otherwise."""
    _check_regular_file(path, MAX_IMAGE_FILE_BYTES)
    if os.path.getsize(path) == 0:
        raise CorruptImageError("empty file (0 bytes)")
    try:
        with _open_header(os.fspath(path)) as image:
            return image.size
    except OSError as exc:
        raise CorruptImageError(f"unreadable file: {one_line(exc, with_type=False)}") from None


def decode_image_file(path: str | os.PathLike, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Read and fully decode an image file to RGB; any failure raises `CorruptImageError(reason)`.
    Only regular files of at most `MAX_IMAGE_FILE_BYTES` are read (FIFOs, devices and huge files are
    refused without reading them), and only images of at most `max_pixels` pixels are decoded (checked
    on the header)."""
    data = _read_regular_file(path, MAX_IMAGE_FILE_BYTES)
    if not data:
        raise CorruptImageError("empty file (0 bytes)")
    image = _open_header(data)
    _check_pixels(image, max_pixels)
    try:
        image.load()  # forces the full decode: truncated data raises here
    except Exception as exc:  # noqa: BLE001
        raise CorruptImageError(f"truncated or corrupt {image.format or 'image'}: "
                                f"{one_line(exc, with_type=False)}") from None
    try:
        return to_rgb(image)
    except Exception as exc:  # noqa: BLE001
        raise CorruptImageError(f"cannot convert {image.mode} image to RGB: {one_line(exc, with_type=False)}") from None


def canonical_image(image: Image.Image, resize_size: int) -> torch.Tensor:
    """The canonical real image: float32 [3, R, R] in [0, 1], R = `resize_size`.

    Shorter side resized to R with bicubic antialiased interpolation, then the centre R x R crop.
    Implemented with torchvision.transforms.v2.functional on the PIL image, which dispatches to PIL's
    resize (bicubic with an antialiasing support window) and rounds to uint8 before scaling to [0, 1]:
    byte-for-byte the `Resize(R, BICUBIC) + CenterCrop(R) + ToTensor()` eval transform that DINOv2 and
    timm's ViTs apply to PIL images. The LGM authors' `transforms.Resize(256)` is torchvision's default,
    bilinear (src/data/dataloaders/imagenet_susbset.py:160), and open_nsfw was trained with bilinear
    resizes: for those, stored images differ slightly from theirs (the README's differences table).
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


def pil_to_float_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1] (the default transform: no resizing).

    Divides by 255 as torchvision's ToTensor does (v2's to_dtype multiplies by 1/255, which differs
    in the last bit), so tensors are bit-identical to the classic eval pipeline's.
    """
    return TF.pil_to_tensor(image).to(torch.float32).div_(255)
