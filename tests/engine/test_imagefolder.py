"""engine.imagefolder: class-folder names, PNG round trip, unknown folders."""

from __future__ import annotations

import pytest
import torch

from engine.imagefolder import class_folder_name, class_folder_names, read_imagefolder, write_imagefolder
from featurestore.errors import UserError


def test_class_folder_names_are_safe_and_unique():
    assert class_folder_name("T-shirt/top") == "T-shirt_top"
    assert class_folder_name("..") == "_" and class_folder_name("a:b*c?") == "a_b_c_"
    assert class_folder_names(["a/b", "a_b", "A_B", "c"]) == ["a_b", "a_b-1", "A_B-2", "c"]


def test_write_then_read_roundtrip(tmp_path):
    names = ["T-shirt/top", "Trouser", "Bag"]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 9, 9, generator=g)
    labels = torch.tensor([2, 0, 2, 1, 0])
    paths = write_imagefolder(tmp_path / "set", images, labels, names)
    assert [p.relative_to(tmp_path / "set").as_posix() for p in paths] == [
        "Bag/0.png", "T-shirt_top/0.png", "Bag/1.png", "Trouser/0.png", "T-shirt_top/1.png"]
    read, read_labels, read_names = read_imagefolder(tmp_path / "set", class_names=names)
    assert read_names == names and sorted(read_labels.tolist()) == sorted(labels.tolist())
    expected = torch.cat([images[labels == c] for c in sorted(set(read_labels.tolist()), key=lambda c:
                                                                  ["Bag", "T-shirt_top", "Trouser"].index(
                                                                      class_folder_names(names)[c]))])
    assert (read - expected).abs().max() <= 0.5 / 255 + 1e-6
    # Without class names the sorted folders are the classes.
    _, _, folders = read_imagefolder(tmp_path / "set")
    assert folders == ["Bag", "T-shirt_top", "Trouser"]
    (tmp_path / "set" / "Sneaker").mkdir()
    with pytest.raises(UserError, match="Sneaker are not classes of this dataset"):
        read_imagefolder(tmp_path / "set", class_names=names)


# ----------------------------------------------------------------------------------------------------
# Issue 20: image sets bounded before decoding; nothing dropped silently


def _small_set(root, classes=("a", "b"), per_class=2, size=16):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.new("RGB", (size, size), (40 * k, 90, 200)).save(root / c / f"{k}.png")
    return root


def test_one_large_image_cannot_inflate_the_set(tmp_path, monkeypatch):
    """Issue 20, defect 3: one 3000x3000 PNG (9 KB) among 16 px images made every image of the set
    3000x3000 (2.5 GB for a small set; an 8000x8000 one ended in an allocator traceback). The sizes are
    read from the headers first: the set's memory at the common size is bounded, one line naming the
    file, before any pixel is decoded."""
    from PIL import Image

    import engine.imagefolder as imagefolder

    root = _small_set(tmp_path / "set")
    Image.new("1", (3000, 3000)).save(root / "a" / "big.png")
    decoded = []
    real_decode = imagefolder.decode_image_file
    monkeypatch.setattr(imagefolder, "decode_image_file", lambda *a, **k: decoded.append(a) or real_decode(*a, **k))
    with pytest.raises(UserError, match=r"big\.png .*3000x3000.* would hold the set's 5 images at 3000x3000 px"):
        read_imagefolder(root, max_bytes=64 << 20)
    assert decoded == []
    _small_set(root, per_class=20)  # 41 images at 3000x3000: 4.1 GiB, over the default bound (<= 4 GiB)
    with pytest.raises(UserError) as info:
        read_imagefolder(root)
    assert "big.png (3000x3000) would hold the set's 41 images" in str(info.value)
    assert "\n" not in str(info.value) and decoded == []


def test_an_image_above_the_pixel_bound_is_one_line_naming_it(tmp_path):
    """Issue 20, defect 3: an 8000x8000 PNG (64 MP, a few KB on disk) is refused from its header."""
    from PIL import Image

    root = _small_set(tmp_path / "set")
    Image.new("1", (8000, 8000)).save(root / "b" / "huge.png")
    with pytest.raises(UserError, match=r"huge\.png: 8000x8000 pixels, more than the 16777216"):
        read_imagefolder(root)


def test_dangling_links_devices_and_empty_class_folders_are_errors(tmp_path):
    """Issue 20, defect 8: a dangling symlink or a link to /dev/zero named x.png was dropped without a
    word (a corrupt PNG was an error), and an empty class folder was accepted silently."""
    root = _small_set(tmp_path / "set")
    (root / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(UserError, match=r"cannot read image .*gone\.png: unreadable file"):
        read_imagefolder(root)
    (root / "a" / "gone.png").unlink()
    (root / "a" / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(UserError, match=r"cannot read image .*zero\.png: not a regular file \(character device\)"):
        read_imagefolder(root)
    (root / "a" / "zero.png").unlink()
    (root / "c").mkdir()
    with pytest.raises(UserError, match=r"class folder .*c holds no images"):
        read_imagefolder(root)
    (root / "c").rmdir()
    images, labels, names = read_imagefolder(root)
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1] and names == ["a", "b"]
