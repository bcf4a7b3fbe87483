"""Dataset readers: layouts, RGB conversion, broken files, limits, IDX parsing, errors, worker loading."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from featurestore.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    CorruptImageError,
    canonical_image,
    dataset_splits,
    decode_image_file,
    list_datasets,
    open_dataset,
    read_idx,
    to_rgb,
)
from featurestore.errors import DatasetError, UserError
from featurestore.views import ViewDataset, collate_views

# ----------------------------------------------------------------------------------------------------
# fixtures: small on-disk trees written with PIL


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def folder_root(tmp_path: Path) -> Path:
    """root/train/{alpha,beta,gamma,zeta}/..., root/val/{alpha,beta}/...; zeta is empty everywhere.

    train/alpha: 3 good images (jpg, grey png, nested RGBA png)
    train/beta : CMYK jpg, 16-bit png, palette gif with transparency + ignored notes.txt/.DS_Store/._x.jpg
    train/gamma: truncated jpg, truncated png, text named fake.jpg, 0-byte empty.JPG, 1 good BMP
    """
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    a = root / "train" / "alpha"
    _save(Image.new("RGB", (32, 24), (200, 30, 40)), a / "a0.jpg", quality=95)
    _save(Image.fromarray(np.full((10, 12), 100, np.uint8)), a / "a1_grey.png")
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue stays blue
    rgba[0, 2] = (0, 255, 0, 128)  # half-transparent green over white
    rgba[1, :] = (10, 20, 30, 255)
    _save(Image.fromarray(rgba, "RGBA"), a / "nested" / "a2_rgba.png")

    b = root / "train" / "beta"
    _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), b / "b0_cmyk.jpg", quality=95)
    sixteen = np.array([[0, 257 * 128, 65535], [256, 1000, 40000]], dtype=np.uint16)
    _save(Image.fromarray(sixteen), b / "b1_16bit.png")
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)  # red; index 0 (black) is the transparent colour
    _save(palette, b / "b2_palette.gif", transparency=0)
    (b / "notes.txt").write_text("not an image")
    (b / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (b / "._b0_cmyk.jpg").write_bytes(b"\0\5\26\7 AppleDouble")

    c = root / "train" / "gamma"
    c.mkdir(parents=True)
    # noise images, so that half of the file is well past the headers, inside the pixel data
    jpeg = _jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (c / "c0_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = _png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (c / "c1_truncated.png").write_bytes(png[: len(png) // 2])
    (c / "c2_fake.jpg").write_text("this is text, not a JPEG\n")
    (c / "c3_empty.JPG").write_bytes(b"")
    _save(Image.new("RGB", (5, 7), (1, 2, 3)), c / "c4_good.BMP")

    (root / "train" / "zeta").mkdir(parents=True)

    _save(Image.new("RGB", (20, 20), (0, 128, 0)), root / "val" / "alpha" / "v0.png")
    _save(Image.new("RGB", (20, 20), (0, 0, 128)), root / "val" / "beta" / "v1.png")
    _save(Image.new("RGB", (20, 20), (9, 9, 9)), root / "val" / "beta" / "v2.png")
    return root


TRAIN_IDS = [
    "train/alpha/a0.jpg", "train/alpha/a1_grey.png", "train/alpha/nested/a2_rgba.png",
    "train/beta/b0_cmyk.jpg", "train/beta/b1_16bit.png", "train/beta/b2_palette.gif",
    "train/gamma/c0_truncated.jpg", "train/gamma/c1_truncated.png", "train/gamma/c2_fake.jpg",
    "train/gamma/c3_empty.JPG", "train/gamma/c4_good.BMP",
]
BROKEN_IDS = {"train/gamma/c0_truncated.jpg", "train/gamma/c1_truncated.png", "train/gamma/c2_fake.jpg",
              "train/gamma/c3_empty.JPG"}


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ----------------------------------------------------------------------------------------------------
# folder datasets


def test_imagefolder_lists_classes_files_and_labels(folder_root: Path) -> None:
    ds = open_dataset("imagefolder", folder_root, "train")
    assert ds.class_names == ["alpha", "beta", "gamma", "zeta"]
    assert ds.sample_ids == TRAIN_IDS  # non-image and hidden files are not listed; nested ones are
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert ds.class_counts().tolist() == [3, 3, 5, 0]
    assert ds.empty_classes == ["zeta"]
    assert ds.root == str(folder_root.resolve()) and ds.split == "train" and len(ds) == 11
    # sample ids find the files again
    assert all((folder_root / sid).is_file() for sid in ds.sample_ids)

    val = open_dataset("imagefolder", folder_root, "val")
    assert val.class_names == ds.class_names  # same indices in every split
    assert val.labels.tolist() == [0, 1, 1]
    assert val.empty_classes == ["gamma", "zeta"]
    assert dataset_splits("imagefolder", folder_root) == ["train", "val"]


def test_conversions_to_rgb_give_exact_values(folder_root: Path) -> None:
    ds = open_dataset("imagefolder", folder_root, "train")
    by_id = {sid: i for i, sid in enumerate(ds.sample_ids)}

    jpg = _pixels(ds.load_image(by_id["train/alpha/a0.jpg"]))
    assert jpg.shape == (24, 32, 3) and np.abs(jpg - [200, 30, 40]).max() <= 3

    grey = _pixels(ds.load_image(by_id["train/alpha/a1_grey.png"]))
    assert grey.shape == (10, 12, 3) and (grey == 100).all()

    rgba = _pixels(ds.load_image(by_id["train/alpha/nested/a2_rgba.png"]))
    assert rgba[0, 0].tolist() == [255, 255, 255]  # transparent -> white background
    assert rgba[0, 1].tolist() == [0, 0, 255]
    assert rgba[0, 2].tolist() == [127, 255, 127]  # 128/255 green over white
    assert (rgba[1] == [10, 20, 30]).all()

    cmyk = _pixels(ds.load_image(by_id["train/beta/b0_cmyk.jpg"]))
    assert np.abs(cmyk - [255, 0, 0]).max() <= 3  # C=0 M=255 Y=255 K=0 is red

    sixteen = _pixels(ds.load_image(by_id["train/beta/b1_16bit.png"]))
    expected = np.rint(np.array([[0, 257 * 128, 65535], [256, 1000, 40000]]) / 257.0)
    assert (sixteen == expected[..., None]).all()
    assert sixteen[0, 2].tolist() == [255, 255, 255] and sixteen[0, 1].tolist() == [128, 128, 128]

    gif = _pixels(ds.load_image(by_id["train/beta/b2_palette.gif"]))
    assert gif[0, 0].tolist() == [255, 0, 0]
    assert gif[1, 1].tolist() == [255, 255, 255]  # transparent palette entry -> white

    bmp = _pixels(ds.load_image(by_id["train/gamma/c4_good.BMP"]))
    assert bmp.shape == (7, 5, 3) and (bmp == [1, 2, 3]).all()


@pytest.mark.parametrize("array, expected", [
    (np.array([[0, 128 * 257, 65535, 300]], np.uint16), [0, 128, 255, 1]),  # I;16: v / 257
    (np.array([[0, 128 * 257, 65535, 70000]], np.int32), [0, 128, 255, 255]),  # I: 16-bit range, clipped
    (np.array([[0.0, 0.5, 1.0, 2.0]], np.float32), [0, 128, 255, 255]),  # F: [0, 1]
])
def test_high_bit_depth_modes_scale_to_8_bit(array: np.ndarray, expected: list[int]) -> None:
    rgb = _pixels(to_rgb(Image.fromarray(array)))
    assert (rgb[0] == np.array(expected)[:, None]).all()


def test_16_bit_tiff_file_is_scaled(tmp_path: Path) -> None:
    _save(Image.fromarray(np.array([[65535, 257 * 10]], np.uint16)), tmp_path / "x.tif")
    assert _pixels(decode_image_file(tmp_path / "x.tif"))[0, :, 0].tolist() == [255, 10]


@pytest.mark.parametrize("sample_id, reason_part", [
    ("train/gamma/c0_truncated.jpg", "truncated"),
    ("train/gamma/c1_truncated.png", "truncated"),
    ("train/gamma/c2_fake.jpg", "not an image"),
    ("train/gamma/c3_empty.JPG", "empty file"),
])
def test_broken_files_raise_corrupt_image_error(folder_root: Path, sample_id: str, reason_part: str) -> None:
    ds = open_dataset("imagefolder", folder_root, "train")
    index = ds.sample_ids.index(sample_id)
    with pytest.raises(CorruptImageError) as info:
        ds.load_image(index)
    assert reason_part in info.value.reason and "\n" not in info.value.reason
    # the build's worker dataset reports instead of raising
    got_index, tensor, reason = ViewDataset(ds, resize_size=8, image_size=8, views=1, seed=0)[index]
    assert (got_index, tensor, reason) == (index, None, info.value.reason)


def test_missing_file_after_listing_is_reported_not_raised(folder_root: Path) -> None:
    ds = ViewDataset(open_dataset("imagefolder", folder_root, "val"), resize_size=8, image_size=8, views=1, seed=0)
    (folder_root / "val" / "beta" / "v2.png").unlink()
    assert ds[2][1] is None and "unreadable" in ds[2][2]


def test_imagenet_class_names_from_synset_mapping(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n02012849", "n03126707", "n09999999"]
    for w in wnids:
        _save(Image.new("RGB", (8, 8), (5, 5, 5)), root / "train" / w / f"{w}_1.JPEG")
    _save(Image.new("RGB", (8, 8), (5, 5, 5)), root / "val" / "n02012849" / "ILSVRC2012_val_1.JPEG")
    (root / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\n"
        "n02012849 crane\n"
        "n03126707 crane\n"
        "n01443537 goldfish, Carassius auratus\n")
    ds = open_dataset("imagenet", root, "train")
    # first name of each line; the two "crane"s carry their wnid; unmapped wnid stays a wnid
    assert ds.class_names == ["tench", "crane (n02012849)", "crane (n03126707)", "n09999999"]
    assert ds.sample_ids[0] == "train/n01440764/n01440764_1.JPEG"
    val = open_dataset("imagenet", root, "val")
    assert val.class_names == ds.class_names and val.labels.tolist() == [1]
    assert sorted(val.empty_classes) == sorted(["tench", "crane (n03126707)", "n09999999"])

    (root / "LOC_synset_mapping.txt").unlink()
    assert open_dataset("imagenet", root, "train").class_names == wnids


def test_limit_per_class_is_first_n_in_sorted_order(folder_root: Path) -> None:
    full = open_dataset("imagefolder", folder_root, "train")
    limited = open_dataset("imagefolder", folder_root, "train", limit_per_class=2)
    again = open_dataset("imagefolder", folder_root, "train", limit_per_class=2)
    expected = [sid for c in range(4) for sid in
                [s for s, l in zip(full.sample_ids, full.labels) if l == c][:2]]
    assert limited.sample_ids == expected == again.sample_ids
    assert limited.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert limited.open_args() == {"name": "imagefolder", "root": str(folder_root.resolve()),
                                   "split": "train", "limit_per_class": 2}
    assert open_dataset(**limited.open_args()).sample_ids == expected
    big = open_dataset("imagefolder", folder_root, "train", limit_per_class=1000)
    assert big.sample_ids == full.sample_ids


# ----------------------------------------------------------------------------------------------------
# canonical image


def test_canonical_image_crops_the_centre_exactly() -> None:
    # 20 wide x 10 high, pixel value 10*x in red: shorter side is already 10, so no resampling happens
    # and the centre 10x10 crop holds columns 5..14.
    row = (np.arange(20) * 10).astype(np.uint8)
    array = np.zeros((10, 20, 3), np.uint8)
    array[..., 0] = row
    array[..., 2] = 7
    out = canonical_image(Image.fromarray(array), 10)
    assert out.shape == (3, 10, 10) and out.dtype == torch.float32
    # (tolerance is float32 rounding; one grey level is 1/255 = 0.004)
    assert torch.allclose(out[0], torch.from_numpy(row[5:15] / 255.0).float().expand(10, 10), atol=1e-6)
    assert torch.equal(out[1], torch.zeros(10, 10))
    assert torch.allclose(out[2], torch.full((10, 10), 7 / 255.0))


def test_canonical_image_matches_the_reference_eval_transform() -> None:
    from torchvision import transforms as T

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    for size in (24, 64):  # down- and up-sampling
        reference = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                               T.CenterCrop(size), T.ToTensor()])(image)
        out = canonical_image(image, size)
        assert out.shape == (3, size, size)
        assert torch.equal(out, reference)
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    # a constant image stays constant under bicubic resizing; a grey image becomes 3 equal channels
    grey = canonical_image(Image.new("L", (9, 31), 77), 16)
    assert torch.allclose(grey, torch.full((3, 16, 16), 77 / 255.0))


# ----------------------------------------------------------------------------------------------------
# worker loading


def test_dataloader_workers_report_broken_files_and_decode_the_rest(folder_root: Path) -> None:
    ds = open_dataset("imagefolder", folder_root, "train")
    views = ViewDataset(ds, resize_size=12, image_size=12, views=1, seed=0)
    loader = DataLoader(views, batch_size=4, num_workers=2, collate_fn=collate_views)
    seen_ok: list[int] = []
    failed: dict[int, str] = {}
    for indices, images, batch_failed in loader:
        if images is not None:
            assert images.shape == (len(indices), 1, 3, 12, 12)
        seen_ok += indices.tolist()
        failed.update(batch_failed)
    broken = {i for i, sid in enumerate(ds.sample_ids) if sid in BROKEN_IDS}
    assert set(failed) == broken
    assert all(isinstance(r, str) and r for r in failed.values())
    assert sorted(seen_ok + list(failed)) == list(range(len(ds)))
    # the workers' tensors equal an in-process decode
    good = sorted(seen_ok)[0]
    assert torch.equal(views[good][1][0], canonical_image(ds.load_image(good), 12))


def test_collate_when_every_sample_fails() -> None:
    indices, images, failed = collate_views([(3, None, "bad"), (4, None, "worse")])
    assert indices.tolist() == [] and images is None
    assert failed == [(3, "bad"), (4, "worse")]


def test_datasets_pickle(folder_root: Path) -> None:
    views = ViewDataset(open_dataset("imagefolder", folder_root, "val"), resize_size=8, image_size=8, views=1, seed=0)
    clone = pickle.loads(pickle.dumps(views))
    assert clone.dataset.sample_ids == views.dataset.sample_ids and torch.equal(clone[0][1], views[0][1])
    gratings = pickle.loads(pickle.dumps(open_dataset("gratings", split="val", limit_per_class=1)))
    assert np.array_equal(np.asarray(gratings.load_image(0)),
                          np.asarray(open_dataset("gratings", split="val").load_image(0)))


# ----------------------------------------------------------------------------------------------------
# fashion-mnist


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture()
def fake_fashion_root(tmp_path: Path) -> Path:
    root = tmp_path / "fmnist"
    root.mkdir()
    images = np.arange(5 * 3 * 2, dtype=np.uint8).reshape(5, 3, 2) * 7
    labels = np.array([9, 0, 9, 3, 9], np.uint8)
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels, 0x08)))
    # val stored uncompressed: both spellings are read
    (root / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images[:2], 0x08))
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels[:2], 0x08))
    return root


def test_idx_parser_reads_bytes_exactly(tmp_path: Path) -> None:
    data = bytes([0, 0, 0x08, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3, 1, 2, 3, 250, 251, 252])
    (tmp_path / "x.gz").write_bytes(gzip.compress(data))
    array = read_idx(tmp_path / "x.gz")
    assert array.dtype == np.uint8 and array.shape == (2, 1, 3)
    assert array.tolist() == [[[1, 2, 3]], [[250, 251, 252]]]
    # big-endian int32 payloads come back native-endian
    ints = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + struct.pack(">2i", -5, 70000)
    (tmp_path / "i.idx").write_bytes(ints)
    assert read_idx(tmp_path / "i.idx").tolist() == [-5, 70000]


@pytest.mark.parametrize("payload, message", [
    (bytes([1, 0, 0x08, 1, 0, 0, 0, 1, 5]), "not an IDX file"),
    (bytes([0, 0, 0x08, 2, 0, 0, 0, 1]), "truncated"),
    (bytes([0, 0, 0x08, 1, 0, 0, 0, 4, 1, 2]), "needs 4"),
])
def test_idx_parser_rejects_bad_files(tmp_path: Path, payload: bytes, message: str) -> None:
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(DatasetError, match=message):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_from_fake_idx_files(fake_fashion_root: Path) -> None:
    ds = open_dataset("fashion-mnist", fake_fashion_root, "train")
    assert ds.class_names == list(FASHION_MNIST_CLASSES) and len(ds.class_names) == 10
    assert ds.labels.tolist() == [9, 0, 9, 3, 9]
    assert ds.sample_ids == ["0", "1", "2", "3", "4"]
    image = _pixels(ds.load_image(3))
    expected = (np.arange(30).reshape(5, 3, 2) * 7)[3]
    assert image.shape == (3, 2, 3) and (image == expected[..., None]).all()
    limited = open_dataset("fashion-mnist", fake_fashion_root, "train", limit_per_class=2)
    assert limited.sample_ids == ["0", "1", "2", "3"]  # index order; the third 9 (index 4) dropped
    assert limited.labels.tolist() == [9, 0, 9, 3]
    assert (_pixels(limited.load_image(3)) == expected[..., None]).all()
    val = open_dataset("fashion-mnist", fake_fashion_root, "val")
    assert val.labels.tolist() == [9, 0]
    assert dataset_splits("fashion-mnist", fake_fashion_root) == ["train", "val"]


# The files, not the folder: a folder left empty (package half removed, or hidden by a bind mount to test a
# machine without it) must skip, not fail.
@pytest.mark.skipif(not all(os.path.isfile(os.path.join(FASHION_MNIST_ROOT, f"{prefix}-{kind}-idx{n}-ubyte.gz"))
                            for prefix in ("train", "t10k") for kind, n in (("images", 3), ("labels", 1))),
                    reason="dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_files() -> None:
    train = open_dataset("fashion-mnist")
    assert len(train) == 60000 and train.class_counts().tolist() == [6000] * 10
    assert train.labels[0] == 9  # the first training image is an ankle boot
    image = train.load_image(0)
    assert image.mode == "RGB" and image.size == (28, 28)
    val = open_dataset("fashion-mnist", split="val")
    assert len(val) == 10000 and val.class_counts().tolist() == [1000] * 10
    assert dataset_splits("fashion-mnist") == ["train", "val"]


# ----------------------------------------------------------------------------------------------------
# gratings


def test_gratings_is_deterministic_and_class_ordered() -> None:
    train = open_dataset("gratings")
    assert len(train) == 2000 and train.class_counts().tolist() == [200] * 10
    assert train.root is None and len(set(train.class_names)) == 10
    a = np.asarray(train.load_image(437))
    b = np.asarray(open_dataset("synthetic").load_image(437))  # the former name still opens the same images
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(train.load_image(438)))
    val = open_dataset("gratings", split="val", limit_per_class=2)
    assert val.sample_ids == [str(c * 50 + k) for c in range(10) for k in range(2)]
    assert val.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert not np.array_equal(np.asarray(val.load_image(0)), np.asarray(train.load_image(0)))
    assert dataset_splits("gratings") == ["train", "val"]


def test_gratings_is_learnable_but_not_trivial() -> None:
    """A linear probe on a random conv net beats chance (10%) clearly, yet is far from perfect."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 5, stride=2, padding=2), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def features(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = open_dataset("gratings", split=split, limit_per_class=per_class)
        with torch.no_grad():
            x = net(torch.stack([canonical_image(ds.load_image(i), 32) for i in range(len(ds))]))
        return x, torch.from_numpy(ds.labels)

    x_train, y_train = features("train", 50)
    x_val, y_val = features("val", 30)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    weight = torch.zeros(x_train.shape[1], 10, requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_train @ weight + bias, y_train) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    accuracy = ((x_val @ weight + bias).argmax(1) == y_val).float().mean().item()
    assert 0.25 < accuracy < 0.9


# ----------------------------------------------------------------------------------------------------
# registry and errors


def test_list_datasets_names_every_dataset() -> None:
    names = [name for name, _ in list_datasets()]
    assert names == ["imagenet", "imagefolder", "fashion-mnist", "gratings"]
    assert all(desc and "\n" not in desc for _, desc in list_datasets())


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_error_messages(folder_root: Path, tmp_path: Path) -> None:
    msg = _one_line_error(open_dataset, "cifar10")
    assert "unknown dataset 'cifar10'" in msg and "imagenet, imagefolder, fashion-mnist, gratings" in msg
    assert "unknown dataset" in _one_line_error(dataset_splits, "cifar10")

    assert "--data-root" in _one_line_error(open_dataset, "imagefolder", None)
    missing = tmp_path / "nowhere"
    msg = _one_line_error(open_dataset, "imagenet", missing)
    assert str(missing) in msg and "does not exist" in msg
    assert "does not exist" in _one_line_error(dataset_splits, "imagefolder", missing)

    msg = _one_line_error(open_dataset, "imagefolder", folder_root, "test")
    assert "no split 'test'" in msg and "splits found: train, val" in msg

    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "train" / "cat" / "readme.txt").write_text("no images here")
    msg = _one_line_error(open_dataset, "imagefolder", empty, "train")
    assert "no images found" in msg and ".jpg" in msg

    flat = tmp_path / "flat"
    _save(Image.new("RGB", (4, 4)), flat / "train" / "c" / "x.png")
    _save(Image.new("RGB", (4, 4)), flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    assert "holds images directly" in _one_line_error(open_dataset, "imagenet", flat, "val")

    for bad in (0, -3):
        msg = _one_line_error(open_dataset, "gratings", limit_per_class=bad)
        assert "--limit-per-class must be a positive integer" in msg
    assert "positive integer" in _one_line_error(open_dataset, "imagefolder", folder_root, limit_per_class=1.5)

    msg = _one_line_error(open_dataset, "fashion-mnist", missing)
    assert f"Fashion-MNIST not found at {missing}" in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg
    no_files = tmp_path / "fm_empty"
    no_files.mkdir()
    assert "apt-get install" in _one_line_error(open_dataset, "fashion-mnist", no_files)
    assert "apt-get install" in _one_line_error(dataset_splits, "fashion-mnist", no_files)
    assert "not 'test'" in _one_line_error(open_dataset, "fashion-mnist", split="test")
    # The split is checked before the files: the same message on a machine without the dataset.
    assert "not 'test'" in _one_line_error(open_dataset, "fashion-mnist", missing, split="test")
    assert "not 'test'" in _one_line_error(open_dataset, "fashion-mnist", no_files, split="test")

    assert "drop --data-root" in _one_line_error(open_dataset, "gratings", folder_root)
    assert "not 'test'" in _one_line_error(open_dataset, "gratings", split="test")


def test_decode_image_file_on_a_good_file(folder_root: Path) -> None:
    image = decode_image_file(folder_root / "val" / "alpha" / "v0.png")
    assert image.mode == "RGB" and _pixels(image)[0, 0].tolist() == [0, 128, 0]
