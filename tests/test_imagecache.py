"""The decoded-image cache: what goes in comes out, pixel for pixel and in the index's
order; one key per folder and settings; an index that does not add up, or images whose
digest does not match, are never trusted; a refused build leaves no folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnet.core.errors import DataError
from convnet.data import imagecache
from convnet.data.folderscan import scan_folder
from convnet.data.imagefiles import decode_image


def _folder(root: Path, sizes: tuple[tuple[int, int], ...] = ((20, 30), (20, 30), (10, 10))) -> Path:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(root / label / f"{i}.png")
    return root


def test_what_is_decoded_comes_back_pixel_for_pixel(tmp_path: Path) -> None:
    scan = scan_folder(_folder(tmp_path / "photos"))
    cache = imagecache.cache_path(scan.root, None, None, tmp_path / "cache")
    index = imagecache.build(cache, scan, None, None, skip_bad_images=False, progress=False)
    assert (index["height"], index["width"], index["channels"]) == (20, 30, 3)  # the most common size; colour
    assert imagecache.read_index(cache) == index
    images = imagecache.load(cache, index)
    assert images is not None and images.shape == (6, 3, 20, 30)
    for row, name in enumerate(index["files"]):
        assert np.array_equal(images[row:row + 1].numpy()[0], decode_image(scan.root / name, 3, (20, 30)))
    assert index["labels"] == [0, 0, 0, 1, 1, 1] and index["bad"] == []


def test_each_setting_has_its_own_cache() -> None:
    root, base = Path("/data/photos"), Path("/cache")
    keys = {imagecache.cache_path(root, size, channels, base) for size in (None, (32, 32)) for channels in (None, 1)}
    assert len(keys) == 4 and all(k.parent == base / "folders" and k.name.startswith("photos-") for k in keys)
    assert imagecache.cache_path(root, None, None, base) == imagecache.cache_path(root, None, None, base)


def test_damaged_images_or_index_are_not_trusted(tmp_path: Path) -> None:
    scan = scan_folder(_folder(tmp_path / "photos"))
    cache = imagecache.cache_path(scan.root, (8, 8), 1, tmp_path / "cache")
    index = imagecache.build(cache, scan, (8, 8), 1, skip_bad_images=False, progress=False)
    raw = bytearray((cache / "images.npy").read_bytes())
    raw[-1] ^= 0xFF  # one pixel changed
    (cache / "images.npy").write_bytes(bytes(raw))
    assert imagecache.load(cache, index) is None
    for broken in ({**index, "labels": index["labels"][:-1]}, {**index, "version": 0}, [1, 2]):
        (cache / "index.json").write_text(json.dumps(broken))
        assert imagecache.read_index(cache) is None
    (cache / "index.json").write_text("{half")
    assert imagecache.read_index(cache) is None


def test_a_bad_image_is_named_or_left_out(tmp_path: Path) -> None:
    root = _folder(tmp_path / "photos")
    (root / "dog" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image")
    scan = scan_folder(root)
    cache = imagecache.cache_path(scan.root, None, None, tmp_path / "cache")
    with pytest.raises(DataError, match=r"cannot decode dog/9.png .*--skip-bad-images"):
        imagecache.build(cache, scan, None, None, skip_bad_images=False, progress=False)
    assert not cache.exists()  # a refused build leaves no folder behind
    index = imagecache.build(cache, scan, None, None, skip_bad_images=True, progress=False)
    assert [b[0] for b in index["bad"]] == ["dog/9.png"] and "dog/9.png" not in index["files"]
    assert len(index["files"]) == 6 and imagecache.load(cache, index) is not None
