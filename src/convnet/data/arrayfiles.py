"""Array files: bytes to uint8 arrays, with numpy alone.

* IDX (MNIST, Fashion-MNIST): :func:`read_idx`, gzipped or not, header checked first.
* CIFAR-10's binary version: :func:`parse_cifar`, records of one label byte and 3,072
  pixel bytes (plain bytes: nothing is ever unpickled).
* ``.npy`` files: :class:`NpyFile`, read along the first axis with plain file reads.

Image files (PNG, JPEG, ...) are :mod:`convnet.data.imagefiles`' job.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from convnet.core.errors import DataError, InputError
from convnet.data.catalog import GZIP_MAGIC

# --- IDX

# IDX type codes (the third byte of the magic number) and the numpy types they hold.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_IDX_BYTES = 1 << 31  # larger IDX files are refused: a guard against gzip bombs (Fashion-MNIST's largest: 47 MB)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``*-idx3-ubyte``, ``*-idx1-ubyte``, gzipped or not).

    The header is read first and only the bytes it declares are then read (or
    decompressed), so a damaged header or a gzip bomb costs no more than
    :data:`MAX_IDX_BYTES` of memory.

    Raises:
        DataError: naming the file and what is wrong with it (not gzip, corrupt gzip,
            truncated, wrong magic number, size that disagrees with the header).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == GZIP_MAGIC
            f.seek(0)
            if not gzipped:
                if path.suffix == ".gz":
                    raise DataError(f"{path}: not a gzip file although its name ends in .gz")
                return _read_idx_stream(f, str(path))
            try:
                with gzip.GzipFile(fileobj=f) as g:
                    return _read_idx_stream(g, str(path))
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path}: corrupt or truncated gzip data ({e}); delete it and fetch it again") from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an IDX file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _read_idx_stream(stream: IO[bytes], name: str) -> np.ndarray:
    head = read_up_to(stream, 4)
    if len(head) == 4:
        head += read_up_to(stream, 4 * head[3])
    header, shape, _, expected = _idx_header(bytes(head), name)
    raw = head + read_up_to(stream, expected - header)
    if len(raw) == expected and stream.read(1):
        raise DataError(f"{name}: has trailing bytes: dimensions {shape} need {expected} bytes, the file has more")
    return parse_idx(raw, name)


def read_up_to(stream: IO[bytes], n: int) -> bytearray:
    """``n`` bytes of ``stream``, fewer at its end; read in pieces, so a header that
    promises much more than the file holds allocates nothing ahead."""
    out = bytearray()
    while len(out) < n and (piece := stream.read(min(n - len(out), 1 << 24))):
        out += piece
    return out


def _idx_header(raw: bytes, name: str) -> tuple[int, tuple[int, ...], np.dtype, int]:
    """Check an IDX header; return its length, the shape, the item type and the file size it implies."""
    if len(raw) < 4:
        raise DataError(f"{name}: truncated IDX file ({len(raw)} bytes, the header alone needs 4)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{name}: wrong magic number 0x{raw[:4].hex()} (an IDX file starts with 00 00, "
            f"a type code in {sorted(hex(c) for c in _IDX_DTYPES)} and the number of dimensions)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_IDX_BYTES:
        raise DataError(f"{name}: IDX dimensions {shape} declare more than the {MAX_IDX_BYTES:,} bytes allowed "
                        "(a damaged header, or a guard against gzip bombs)")
    return header, shape, dtype, header + math.prod(shape) * dtype.itemsize


def parse_idx(raw: bytes | bytearray, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file; see :func:`read_idx`."""
    header, shape, dtype, expected = _idx_header(bytes(raw[:1024]), name)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{name}: {what}: dimensions {shape} need {expected} bytes, the file has {len(raw)}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


# --- CIFAR-10, binary version

CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the red, green and blue planes, row by row


def parse_cifar(raw: bytes, name: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of one file of CIFAR-10's binary version (``data_batch_1.bin`` …).

    Returns:
        uint8 images ``(N, 3, 32, 32)`` (channels first, as stored) and uint8 labels ``(N,)``.

    Raises:
        DataError: the length is not a whole number of records, or a label is outside
            ``0..num_classes-1``.
    """
    if not raw or len(raw) % CIFAR_RECORD:
        raise DataError(f"{name}: {len(raw):,} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR records; "
                        "delete it and fetch it again")
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].copy()
    if labels.max() >= num_classes:
        raise DataError(f"{name}: label {int(labels.max())} is outside 0..{num_classes - 1}; the file is damaged")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


# --- .npy files


class NpyFile:
    """A ``.npy`` file read along its first axis with plain file reads: ``npy[a:b]`` is a
    copy of rows ``a..b``, so a file of any size is never held whole (nor mapped into the
    process), and nothing is ever unpickled.

    Raises:
        InputError: not a ``.npy`` file, a damaged header, Python objects, too short.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":
                    raise InputError(f"{path}: not a valid .npy file (no NumPy header); save arrays with numpy.save")
                f.seek(0)
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(f)
                self.offset = f.tell()
                data_bytes = os.fstat(f.fileno()).st_size - self.offset
        except InputError:
            raise
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except OSError as e:
            raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
        except Exception:  # noqa: BLE001 (numpy's header parser raises ValueError, SyntaxError, tokenize errors…)
            raise InputError(f"{path}: not a valid .npy file (its header is damaged); save arrays with numpy.save") \
                from None
        if dtype.hasobject:
            raise InputError(f"{path}: holds Python objects ({dtype}); reading them needs unpickling, which convnet "
                             "never does; save a numeric array")
        if any(d < 0 for d in shape):
            raise InputError(f"{path}: not a valid .npy file (shape {shape})")
        needed = math.prod(shape) * dtype.itemsize
        if data_bytes < needed:
            raise InputError(f"{path}: truncated .npy file: shape {shape} of {dtype} needs {needed:,} bytes of data, "
                             f"the file holds {data_bytes:,}")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype = dtype
        self.fortran_order = bool(fortran_order)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(start, stop)
        part = (stop - start, *self.shape[1:])
        if math.prod(part) == 0:
            return np.empty(part, self.dtype)
        if self.fortran_order:  # rows are not contiguous on disk; numpy writes this order only when asked
            mapped = np.memmap(self.path, self.dtype, "r", offset=self.offset, shape=self.shape, order="F")
            return np.array(mapped[start:stop])
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset + start * self.row_bytes)
                data = f.read((stop - start) * self.row_bytes)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {e.strerror or e}") from None
        if len(data) != (stop - start) * self.row_bytes:
            raise InputError(f"{self.path}: the file became shorter while it was read")
        return np.frombuffer(data, self.dtype).reshape(part)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed), one positioned read each."""
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        if self.fortran_order:
            mapped = np.memmap(self.path, self.dtype, "r", offset=self.offset, shape=self.shape, order="F")
            out[:] = mapped[rows]
            return out
        size = self.row_bytes
        flat = out.reshape(len(rows), -1).view(np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, r in enumerate(rows.tolist()):
                if os.preadv(fd, [memoryview(flat[i])], self.offset + r * size) != size:
                    raise InputError(f"{self.path}: the file became shorter while it was read")
        finally:
            os.close(fd)
        return out
