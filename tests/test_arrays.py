"""Images in a model's input spec: image files of any mode and arrays in either layout,
converted to the spec's size and channels the way Pillow would."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.core.errors import InputError
from convnet.data.arrays import array_batches, images_from_array, load_image
from convnet.data.catalog import DATASETS
from convnet.data.dataset import InputSpec

FASHION = DATASETS["fashion-mnist"].spec  # grey 28x28, drawn light on black


def test_layouts_give_the_same_images() -> None:
    first = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28)).astype(np.uint8)
    last = first.transpose(0, 2, 3, 1)
    for arr, layout in ((first, "auto"), (last, "auto"), (first[:, 0], "auto"), (first, "nchw"), (last, "nhwc")):
        got = images_from_array(arr, "a", FASHION, layout=layout)
        assert torch.equal(got, torch.from_numpy(first)), (arr.shape, layout)
    as_float = first.astype(np.float32) / 255.0
    assert torch.equal(images_from_array(as_float, "f", FASHION), torch.from_numpy(first))
    with pytest.raises(InputError, match="not nhwc"):
        images_from_array(first, "a", FASHION, layout="nhwc")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((3, 28, 27), np.uint8), "shape"),
        (np.zeros((3, 2, 28, 28), np.uint8), "shape"),
        (np.full((2, 28, 28), np.nan, np.float32), "NaN"),
        (np.full((2, 28, 28), 300.0, np.float32), "values in"),
        (np.full((2, 28, 28), -1, np.int32), "integer values"),
        (np.zeros((2, 28, 28), np.complex64), "complex64"),
        (np.zeros((2, 28, 28), bool), "bool"),
    ],
)
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message):
        images_from_array(array, "x.npy", FASHION)


def _shirt(size: tuple[int, int] = (40, 60), background: int = 255, fg: int = 30) -> np.ndarray:
    a = np.full((size[1], size[0]), background, np.uint8)
    a[10:50, 8:32] = fg
    return a


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
def test_images_of_any_mode_become_28x28_grey(tmp_path: Path, mode: str) -> None:
    grey = _shirt()
    img = Image.fromarray(grey, "L")
    if mode == "I;16":
        img = Image.fromarray(grey.astype(np.uint16) * 257)
    elif mode != "L":
        img = img.convert(mode)
    suffix = ".tiff" if mode in ("CMYK", "I;16") else ".png"
    p = tmp_path / f"x{suffix}"
    img.save(p)
    x = load_image(p, FASHION)
    assert x.shape == (1, 28, 28) and x.dtype == torch.uint8
    # white background -> inverted to Fashion-MNIST's black, dark object -> light
    assert int(x[0, 0, 0]) < 30 and int(x[0, 14, 14]) > 150


def test_transparent_background_counts_as_white(tmp_path: Path) -> None:
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (20, 20, 20, 255)  # dark opaque square on a transparent field
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", FASHION)
    assert int(x[0, 0, 0]) < 30 and int(x[0, 14, 14]) > 150


def test_black_background_is_kept(tmp_path: Path) -> None:
    Image.fromarray(_shirt(background=0, fg=220), "L").save(tmp_path / "b.png")
    x = load_image(tmp_path / "b.png", FASHION)
    assert int(x[0, 0, 0]) < 30 and int(x[0, 14, 14]) > 150


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    for side in (8_000, 10_000):  # 64 Mpx (our limit), 100 Mpx (Pillow's too); a few kB on disk
        Image.new("1", (side, side)).save(tmp_path / "bomb.png")
        with pytest.raises(InputError, match="more than the 50,000,000 pixels"):
            load_image(tmp_path / "bomb.png", FASHION)


# --- streaming: bounded batches, same results


def test_array_batches_check_everything_before_the_first_batch() -> None:
    arr = np.zeros((10, 28, 28), np.float32)
    arr[9, 0, 0] = np.nan  # in the last batch
    with pytest.raises(InputError, match="NaN"):
        next(array_batches(arr, "x.npy", FASHION, batch_size=2))
    arr[9, 0, 0] = 2.0  # floats must be in [0, 1] (or [0, 255]) as a whole, not batch by batch
    arr[0, 0, 0] = 0.5
    first = next(array_batches(arr, "x.npy", FASHION, batch_size=2))
    assert int(first[0, 0, 0, 0]) == 0  # 0.5 is read on the [0, 255] scale, as the whole array says
    arr[9, 0, 0] = -1
    with pytest.raises(InputError, match=r"values in \[-1, 0.5\]"):
        next(array_batches(arr, "x.npy", FASHION, batch_size=2))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# --- colour, and sizes other than 28x28

COLOUR = InputSpec(3, 32, 24, tuple("abcde"))


def test_colour_arrays_in_both_layouts() -> None:
    first = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 24)).astype(np.uint8)  # (N, C, H, W)
    last = first.transpose(0, 2, 3, 1)  # (N, H, W, C)
    for arr, layout in ((first, "auto"), (last, "auto"), (first, "nchw"), (last, "nhwc")):
        assert torch.equal(images_from_array(arr, "a", COLOUR, layout), torch.from_numpy(first)), (arr.shape, layout)
    with pytest.raises(InputError, match=r"expected \(N, 32, 24\), \(N, 3, 32, 24\) or \(N, 32, 24, 3\)"):
        images_from_array(first[:, :, :, :20], "a", COLOUR)


def test_grey_and_colour_arrays_are_converted_like_pillow() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 32, 24, 3)).astype(np.uint8)
    grey = images_from_array(rgb, "rgb", InputSpec(1, 32, 24, ("a", "b")))  # colour -> grey
    pillow = np.stack([np.asarray(Image.fromarray(x, "RGB").convert("L")) for x in rgb])
    assert torch.equal(grey[:, 0], torch.from_numpy(pillow))
    plain = rng.integers(0, 256, (2, 32, 24)).astype(np.uint8)  # (N, H, W) grey -> colour: repeated
    colour = images_from_array(plain, "grey", COLOUR)
    assert colour.shape == (2, 3, 32, 24) and all(torch.equal(colour[:, c], torch.from_numpy(plain)) for c in range(3))


def test_ambiguous_shape_is_refused_until_layout_says() -> None:
    cube = InputSpec(3, 3, 3, ("a", "b"))  # (N, 3, 3, 3) reads both ways
    a = np.arange(2 * 27, dtype=np.uint8).reshape(2, 3, 3, 3)
    with pytest.raises(InputError, match="reads both as channels first .* say which with --layout"):
        images_from_array(a, "a", cube)
    assert torch.equal(images_from_array(a, "a", cube, "nchw"), torch.from_numpy(a))
    assert torch.equal(images_from_array(a, "a", cube, "nhwc"), torch.from_numpy(a.transpose(0, 3, 1, 2).copy()))


def test_colour_image_file_keeps_its_colour_and_aspect(tmp_path: Path) -> None:
    img = np.zeros((20, 40, 3), np.uint8)  # a wide picture: red left half, blue right half
    img[:, :20] = (255, 0, 0)
    img[:, 20:] = (0, 0, 255)
    Image.fromarray(img, "RGB").save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", InputSpec(3, 16, 16, ("a", "b")))
    assert x.shape == (3, 16, 16)
    assert x[0, 8, 2] > 200 and x[2, 8, 2] < 50 and x[2, 8, 13] > 200 and x[0, 8, 13] < 50  # red left, blue right
    # padded, not stretched: the 2:1 picture fills the middle half; the rows above and below
    # take the border's mean colour (a purple), not red or blue
    top = x[:, 1, 8].tolist()
    assert abs(top[0] - top[2]) < 40 and top[1] < 50, top
    no_invert = load_image(tmp_path / "wide.png", InputSpec(3, 16, 16, ("a", "b"), dark_background=False))
    assert torch.equal(no_invert, x)  # only dark-background data sets invert
