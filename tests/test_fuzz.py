"""Property tests: whatever bytes or arrays come in, the readers either succeed with the
documented result or raise the documented error (DataError for IDX data, InputError for
prediction inputs); nothing else escapes."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from convnet.core.errors import DataError, InputError
from convnet.data.arrayfiles import parse_idx, read_idx
from convnet.data.arrays import images_from_array
from convnet.data.catalog import DATASETS
from convnet.data.inputfiles import input_batches, load_input

from .conftest import idx_bytes

FASHION = DATASETS["fashion-mnist"].spec  # grey 28x28, drawn light on black

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _image_bytes(mode: str, fmt: str, size: tuple[int, int] = (30, 20)) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L")
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
    elif mode != "L":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


_IMAGES = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
VALID: dict[str, list[bytes]] = {  # suffix -> well-formed files to mutate
    ".png": [_image_bytes("L", "PNG"), _image_bytes("P", "PNG"), _image_bytes("RGBA", "PNG"),
             _image_bytes("I;16", "PNG")],
    ".jpg": [_image_bytes("RGB", "JPEG"), _image_bytes("CMYK", "JPEG")],
    ".gif": [_image_bytes("P", "GIF")],
    ".bmp": [_image_bytes("RGB", "BMP")],
    ".tiff": [_image_bytes("I;16", "TIFF"), _image_bytes("CMYK", "TIFF")],
    ".npy": [_npy_bytes(_IMAGES), _npy_bytes(_IMAGES[:, None].astype(np.float32) / 255),
             _npy_bytes(np.asfortranarray(_IMAGES[..., None]))],
    ".gz": [gzip.compress(idx_bytes(_IMAGES)), gzip.compress(idx_bytes(_IMAGES[:2, None]))],
}


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few bytes changed, cut, inserted or deleted, mostly near the
    start where the headers are."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.one_of(st.integers(0, min(len(data), 96) - 1), st.integers(0, len(data) - 1)))
        op = draw(st.sampled_from(("set", "set", "cut", "insert", "delete")))
        if op == "set":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# --- IDX


@FUZZ
@given(st.binary(max_size=300))
def test_parse_idx_on_arbitrary_bytes(raw: bytes) -> None:
    try:
        parse_idx(raw)
    except DataError:
        pass


@st.composite
def idx_like(draw: st.DrawFn) -> bytes:
    """A plausible IDX header (any type code, 0-4 dimensions) and a body of about the
    right length: reaches past the header checks."""
    code = draw(st.sampled_from((0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07, 0x0A)))
    dims = draw(st.lists(st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1)), max_size=4))
    head = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    size = int(np.prod(dims, dtype=object)) if dims else 0
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(code, 1)
    body_len = draw(st.one_of(st.just(min(size * itemsize, 2000)), st.integers(0, 2000)))
    return head + draw(st.binary(min_size=body_len, max_size=body_len))


@FUZZ
@given(idx_like())
def test_parse_idx_on_plausible_headers(raw: bytes) -> None:
    try:
        out = parse_idx(raw)
    except DataError:
        return
    assert isinstance(out, np.ndarray) and out.dtype.isnative


@FUZZ
@given(st.data())
def test_read_idx_on_damaged_files(scratch: Path, data: st.DataObject) -> None:
    original = data.draw(st.sampled_from(VALID[".gz"]))
    kind = data.draw(st.sampled_from(("gz", "idx-in-gz", "plain", "random")))
    if kind == "gz":  # damage the compressed stream
        raw, name = data.draw(mutated(original)), "x-idx3-ubyte.gz"
    elif kind == "idx-in-gz":  # a valid gzip of damaged IDX bytes
        raw, name = gzip.compress(data.draw(mutated(gzip.decompress(original)))), "x-idx3-ubyte.gz"
    elif kind == "plain":
        raw, name = data.draw(mutated(gzip.decompress(original))), "x-idx3-ubyte"
    else:
        raw, name = data.draw(st.binary(max_size=300)), data.draw(st.sampled_from(("r-idx1-ubyte", "r.gz")))
    try:
        read_idx(_write(scratch, name, raw))
    except DataError as e:
        assert name in str(e)


# --- prediction inputs


def _check_loaded(path: Path) -> None:
    try:
        got = load_input(path, FASHION)
    except InputError as e:
        assert path.name in str(e)
        return
    assert got.images.dtype == torch.uint8 and got.images.ndim == 4 and got.images.shape[1:] == (1, 28, 28)
    assert len(got.names) == len(got.images)


@FUZZ
@given(st.sampled_from(sorted(VALID)), st.binary(max_size=400))
def test_load_input_on_arbitrary_bytes(scratch: Path, suffix: str, raw: bytes) -> None:
    _check_loaded(_write(scratch, f"any{suffix}", raw))


@FUZZ
@given(st.data())
def test_load_input_on_damaged_files(scratch: Path, data: st.DataObject) -> None:
    suffix = data.draw(st.sampled_from(sorted(VALID)))
    raw = data.draw(mutated(data.draw(st.sampled_from(VALID[suffix]))))
    _check_loaded(_write(scratch, f"damaged{suffix}", raw))


@FUZZ
@given(st.data())
def test_streamed_inputs_match_whole_ones(scratch: Path, data: st.DataObject) -> None:
    """input_batches gives the same names and images as load_input, whatever the files."""
    paths = []
    for i in range(data.draw(st.integers(1, 4))):
        suffix = data.draw(st.sampled_from(sorted(VALID)))
        raw = data.draw(st.one_of(st.sampled_from(VALID[suffix]), mutated(VALID[suffix][0])))
        paths.append(_write(scratch, f"s{i}{suffix}", raw))
    whole: list[str] = []
    images = []
    for p in paths:
        try:
            got = load_input(p, FASHION)
        except InputError as e:
            whole.append(str(e))
            continue
        whole += got.names
        images.append(got.images)
    batch_size = data.draw(st.integers(1, 5))
    streamed: list[str] = []
    streamed_images = []
    for item in input_batches(paths, FASHION, batch_size=batch_size):
        if isinstance(item, InputError):
            streamed.append(str(item))
            continue
        assert 1 <= len(item.images) <= batch_size
        streamed += item.names
        streamed_images.append(item.images)
    assert streamed == whole
    if images:
        assert torch.equal(torch.cat(streamed_images), torch.cat(images))


# --- arrays


def _shapes() -> st.SearchStrategy[tuple[int, ...]]:
    near = st.sampled_from([(28, 28), (2, 28, 28), (2, 1, 28, 28), (2, 28, 28, 1), (0, 28, 28), (2, 3, 28, 28),
                            (2, 28, 28, 3), (1, 1, 1, 28, 28), (28,), ()])
    return st.one_of(near, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4))


_DTYPES = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                    hnp.boolean_dtypes(), hnp.complex_number_dtypes(), hnp.datetime64_dtypes(),
                    hnp.byte_string_dtypes(max_len=3), hnp.unicode_string_dtypes(max_len=3))


@FUZZ
@given(hnp.arrays(_DTYPES, _shapes()), st.sampled_from(("auto", "nchw", "nhwc")))
def test_images_from_any_array(array: np.ndarray, layout: str) -> None:
    try:
        out = images_from_array(array, "a.npy", FASHION, layout=layout)
    except InputError:
        return
    assert out.dtype == torch.uint8 and out.ndim == 4 and out.shape[1:] == (1, 28, 28)
