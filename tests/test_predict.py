from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.engine import Engine
from convnet.errors import InputError
from convnet.models import create_model
from convnet.predict import images_from_array, infer, load_array, load_image, load_input, predict

from .conftest import write_idx


def test_infer_matches_a_plain_forward_pass() -> None:
    model = create_model("seed").eval()
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(images.float() / 255.0)
    for engine in (Engine.faithful(), Engine.fast()):
        torch.testing.assert_close(infer(model, images, engine=engine, batch_size=128), expected)
    pred = predict(model, images)
    assert pred.labels.shape == (300,) and torch.equal(pred.labels, expected.argmax(1))
    torch.testing.assert_close(pred.probabilities.sum(1), torch.ones(300))


def test_layouts_give_the_same_images() -> None:
    first = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28)).astype(np.uint8)
    last = first.transpose(0, 2, 3, 1)
    for arr, layout in ((first, "auto"), (last, "auto"), (first[:, 0], "auto"), (first, "nchw"), (last, "nhwc")):
        assert torch.equal(images_from_array(arr, "a", layout=layout), torch.from_numpy(first)), (arr.shape, layout)
    as_float = first.astype(np.float32) / 255.0
    assert torch.equal(images_from_array(as_float, "f"), torch.from_numpy(first))
    with pytest.raises(InputError, match="not nhwc"):
        images_from_array(first, "a", layout="nhwc")


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
        images_from_array(array, "x.npy")


def test_npy_with_objects_is_refused_unread(tmp_path: Path) -> None:
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="unpickling"):
        load_array(p)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="not a valid .npy"):
        load_array(tmp_path / "junk.npy")


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
    x = load_image(p)
    assert x.shape == (1, 28, 28) and x.dtype == torch.uint8
    # white background -> inverted to Fashion-MNIST's black, dark object -> light
    assert int(x[0, 0, 0]) < 30 and int(x[0, 14, 14]) > 150


def test_transparent_background_counts_as_white(tmp_path: Path) -> None:
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (20, 20, 20, 255)  # dark opaque square on a transparent field
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert int(x[0, 0, 0]) < 30 and int(x[0, 14, 14]) > 150


def test_black_background_is_kept(tmp_path: Path) -> None:
    Image.fromarray(_shirt(background=0, fg=220), "L").save(tmp_path / "b.png")
    x = load_image(tmp_path / "b.png")
    assert int(x[0, 0, 0]) < 30 and int(x[0, 14, 14]) > 150


def test_bad_image_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    Image.fromarray(_shirt(), "L").save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("empty.png", "text.png", "cut.png"):
        with pytest.raises(InputError, match=name):
            load_input(tmp_path / name)
    with pytest.raises(InputError, match="no such file"):
        load_input(tmp_path / "absent.png")
    with pytest.raises(InputError, match="is a folder"):
        load_input(tmp_path)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    for side in (8_000, 10_000):  # 64 Mpx (our limit), 100 Mpx (Pillow's too); a few kB on disk
        Image.new("1", (side, side)).save(tmp_path / "bomb.png")
        with pytest.raises(InputError, match="more than the 50,000,000 pixels"):
            load_image(tmp_path / "bomb.png")


def test_idx_input(tmp_path: Path) -> None:
    a = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    p = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", a)
    got = load_input(p)
    assert got.images.shape == (7, 1, 28, 28) and torch.equal(got.images[:, 0], torch.from_numpy(a))
    assert got.names[3] == f"{p}[3]"
