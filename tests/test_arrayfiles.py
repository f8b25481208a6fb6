"""File formats: IDX (gzipped or not, damaged, bombs) and CIFAR-10's binary records."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from convnet.core.errors import DataError
from convnet.data.arrayfiles import CIFAR_RECORD, parse_cifar, parse_idx, read_idx

from .conftest import idx_bytes, write_idx


def test_idx_round_trip_gzipped_and_plain(tmp_path: Path) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        p = write_idx(tmp_path / f"x-{gz}", a, gz)
        np.testing.assert_array_equal(read_idx(p), a)


def test_idx_big_endian_int32() -> None:
    raw = bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + np.array([1, -2, 70000], ">i4").tobytes()
    np.testing.assert_array_equal(parse_idx(raw), [1, -2, 70000])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "truncated IDX file"),
        (b"\x12\x34\x08\x01" + b"\x00" * 8, "wrong magic number"),
        (b"\x00\x00\x07\x01" + b"\x00" * 8, "wrong magic number"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (idx_bytes(np.zeros((4, 5), np.uint8))[:-3], "truncated"),
        (idx_bytes(np.zeros((4, 5), np.uint8)) + b"\x00", "trailing bytes"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
    ],
)
def test_idx_errors_name_the_problem(raw: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_idx(raw, name="bad.idx")


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(DataError, match=f"{p}.*not a gzip"):
        read_idx(p)
    good = gzip.compress(idx_bytes(np.zeros((10, 28, 28), np.uint8)))
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_idx(p)
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "missing")


# --- damaged headers, bombs, inconsistent splits


def test_idx_header_that_declares_too_much(tmp_path: Path) -> None:
    huge = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 100_000, 1000, 1000)  # 100 GB promised, 16 bytes held
    with pytest.raises(DataError, match="more than the .* bytes allowed"):
        parse_idx(huge)
    empty_but_absurd = bytes([0, 0, 0x08, 4]) + struct.pack(">4I", 0, 2**32 - 1, 2**32 - 1, 2**32 - 1)
    with pytest.raises(DataError, match="more than the"):  # numpy would overflow on such a shape
        parse_idx(empty_but_absurd)
    p = tmp_path / "bomb-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(huge))
    with pytest.raises(DataError, match=f"{p}.*more than the"):
        read_idx(p)


def test_gzip_bomb_is_not_decompressed_past_the_header(tmp_path: Path) -> None:
    """10 bytes declared, 20 MB of zeros after them: refused after reading one byte more."""
    p = tmp_path / "x-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros(10, np.uint8)) + bytes(20_000_000)))
    assert p.stat().st_size < 100_000
    with pytest.raises(DataError, match="has trailing bytes"):
        read_idx(p)
    plain = tmp_path / "y-idx1-ubyte"
    plain.write_bytes(idx_bytes(np.zeros(10, np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="has trailing bytes"):
        read_idx(plain)


def test_gzip_multi_member_file_reads_whole(tmp_path: Path) -> None:
    raw = idx_bytes(np.arange(100, dtype=np.uint8).reshape(10, 10))
    p = tmp_path / "m-idx2-ubyte.gz"
    p.write_bytes(gzip.compress(raw[:30]) + gzip.compress(raw[30:]))  # what `cat a.gz b.gz` makes
    np.testing.assert_array_equal(read_idx(p), np.arange(100).reshape(10, 10))


def test_cifar_records_parse_channels_first() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], np.uint8)
    raw = b"".join(bytes([y]) + img.tobytes() for y, img in zip(labels, images, strict=True))
    x, y = parse_cifar(raw, "batch.bin")
    assert x.shape == (5, 3, 32, 32) and np.array_equal(x, images) and np.array_equal(y, labels)
    with pytest.raises(DataError, match="batch.bin: .* not a whole number of 3073-byte CIFAR records"):
        parse_cifar(raw[:-1], "batch.bin")
    with pytest.raises(DataError, match="label 10 is outside 0..9"):
        parse_cifar(bytes([10]) + bytes(CIFAR_RECORD - 1), "batch.bin")
    with pytest.raises(DataError, match="not a whole number"):
        parse_cifar(b"", "batch.bin")
