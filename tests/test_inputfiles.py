"""Files named for prediction: image files, IDX and .npy files read into batches of a
bounded size in a run's input spec, each bad file named in its place; .npy files read a
row at a time and never unpickled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.core.errors import InputError
from convnet.data.arrayfiles import NpyFile
from convnet.data.inputfiles import Batch, input_batches, load_array, load_input

from .conftest import write_idx
from .test_arrays import FASHION, _npy_bytes, _shirt


def test_bad_image_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    Image.fromarray(_shirt(), "L").save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("empty.png", "text.png", "cut.png"):
        with pytest.raises(InputError, match=name):
            load_input(tmp_path / name, FASHION)
    with pytest.raises(InputError, match="no such file"):
        load_input(tmp_path / "absent.png", FASHION)
    with pytest.raises(InputError, match="is a folder"):
        load_input(tmp_path, FASHION)


def test_idx_input(tmp_path: Path) -> None:
    a = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    p = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", a)
    got = load_input(p, FASHION)
    assert got.images.shape == (7, 1, 28, 28) and torch.equal(got.images[:, 0], torch.from_numpy(a))
    assert got.names[3] == f"{p}[3]"


def test_input_batches_group_files_and_split_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (10, 28, 28)).astype(np.uint8)
    np.save(tmp_path / "a.npy", arr)
    for i in range(3):
        Image.fromarray(arr[i], "L").save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths = [tmp_path / "0.png", tmp_path / "a.npy", tmp_path / "bad.png", tmp_path / "1.png", tmp_path / "2.png"]
    items = list(input_batches(paths, FASHION, batch_size=4))
    kinds = [len(i.images) if isinstance(i, Batch) else "error" for i in items]
    assert kinds == [4, 4, 3, "error", 2]  # full batches across files; what came before an error comes first
    batches = [i for i in items if isinstance(i, Batch)]
    assert all(b.images.shape[1:] == (1, 28, 28) and b.images.dtype == torch.uint8 for b in batches)
    names = [n for i in items if isinstance(i, Batch) for n in i.names]
    assert names == [str(paths[0]), *(f"{paths[1]}[{k}]" for k in range(10)), str(paths[3]), str(paths[4])]
    streamed = torch.cat([i.images for i in items if isinstance(i, Batch)])
    assert torch.equal(streamed[1:11, 0], torch.from_numpy(arr))
    assert "bad.png" in str(items[3])


def test_npy_with_objects_is_refused_unread(tmp_path: Path) -> None:
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="unpickling"):
        load_array(p, FASHION)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="not a valid .npy"):
        load_array(tmp_path / "junk.npy", FASHION)


def test_npy_file_reads_rows_without_loading_the_whole(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (50, 28, 28, 1)).astype(np.uint8)
    for order in ("C", "F"):
        np.save(tmp_path / "a.npy", np.asarray(arr, order=order))
        npy = NpyFile(tmp_path / "a.npy")
        assert npy.shape == arr.shape and len(npy) == 50
        np.testing.assert_array_equal(npy[7:19], arr[7:19])
        np.testing.assert_array_equal(npy[45:99], arr[45:])
        assert torch.equal(load_array(tmp_path / "a.npy", FASHION), torch.from_numpy(arr.transpose(0, 3, 1, 2).copy()))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: np.save(p, np.zeros((0, 28, 28), np.uint8)), "holds no images"),
        (lambda p: p.write_bytes(_npy_bytes(np.zeros((5, 28, 28), np.uint8))[:-100]), "truncated .npy file"),
        (lambda p: p.write_bytes(_npy_bytes(np.zeros((5, 28, 28), np.uint8)).replace(b"'shape'", b"'shap'")),
         "header is damaged"),
        (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 20), "header is damaged"),
        (lambda p: np.save(p, np.zeros((5, 28, 28), "U1")), "<U1 values"),
        (lambda p: np.save(p, np.zeros((5, 28, 28), [("a", "u1")])), "values"),
        (lambda p: np.save(p, np.array([[1, 2]], dtype=object), allow_pickle=True), "unpickling"),
    ],
    ids=["empty", "truncated", "bad-header-key", "garbage-header", "strings", "structured", "objects"],
)
def test_bad_npy_files(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "x.npy"
    make(p)
    with pytest.raises(InputError, match=message):
        load_input(p, FASHION)
    assert [type(i) for i in input_batches([p], FASHION)] == [InputError]
